"""``python -m worker``: parse config (CLI > env > defaults), configure logging, serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from worker.config import add_worker_arguments, worker_config_from_args
from worker.server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="worker", description="pagedserve worker")
    add_worker_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = worker_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    sys.exit(asyncio.run(serve(config)))


if __name__ == "__main__":
    main()
