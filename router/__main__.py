"""``python -m router``: parse config, configure logging, serve."""

from __future__ import annotations

import argparse
import asyncio
import logging

from router.config import add_router_arguments, router_config_from_args
from router.server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="router", description="pagedserve router")
    add_router_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = router_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
