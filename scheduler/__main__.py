"""``python -m scheduler`` (or ``pagedserve scheduler``): run the central scheduler."""

from __future__ import annotations

import argparse
import asyncio

from pagedserve.core.logs import add_logging_arguments, configure_logging
from scheduler.config import add_scheduler_arguments, scheduler_config_from_args
from scheduler.server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pagedserve scheduler")
    add_scheduler_arguments(parser)
    add_logging_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format, "scheduler")
    try:
        config = scheduler_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if not config.worker_addresses and not config.worker_discovery:
        parser.error(
            "give --worker HOST:PORT (repeatable) or --worker-discovery k8s-headless=NAME:PORT"
        )
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
