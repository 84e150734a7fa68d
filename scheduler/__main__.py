"""``python -m scheduler`` (or ``pagedserve scheduler``): run the central scheduler."""

from __future__ import annotations

import argparse
import asyncio
import logging

from scheduler.config import add_scheduler_arguments, scheduler_config_from_args
from scheduler.server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pagedserve scheduler")
    add_scheduler_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
