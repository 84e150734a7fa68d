"""``python -m worker``: parse config (CLI > env > defaults), configure logging, serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from pagedserve.core.logs import add_logging_arguments, configure_logging
from worker.config import add_worker_arguments, worker_config_from_args
from worker.server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="worker", description="pagedserve worker")
    add_worker_arguments(parser)
    add_logging_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format, "worker")
    try:
        config = worker_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    status = asyncio.run(serve(config))
    if status != 0:
        # This rank's tensor-parallel group failed. Its process group is left as is (tearing it
        # down would wait on the dead peer), so its C++ threads are still running: interpreter
        # exit would destroy them joinable, and std::terminate turns the exit status into
        # SIGABRT. Leave at once, with the log flushed, so the supervisor sees the 1.
        logging.shutdown()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    main()
