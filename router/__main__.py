"""``python -m router``: parse config, configure logging, serve."""

from __future__ import annotations

import argparse
import asyncio

from pagedserve.core.logs import add_logging_arguments, configure_logging
from router.config import add_router_arguments, router_config_from_args
from router.server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="router", description="pagedserve router")
    add_router_arguments(parser)
    add_logging_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format, "router")
    try:
        config = router_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
