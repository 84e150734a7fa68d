"""How every service logs: ``--log-level`` and ``--log-format`` (``text`` for people, ``json``
for a log pipeline: Loki, Elasticsearch, Cloud Logging), one place for all of them.

``json`` writes one object a line (``python-json-logger``): ``timestamp`` (ISO 8601, UTC),
``level``, ``logger``, ``message``, ``service`` (router, scheduler, worker, up), ``exc_info``
with the traceback when there is one, and any ``extra=`` fields a call passes. Python warnings
go through logging too, so a line on stderr is always one record. Messages are the
same in both formats: they name request and key ids, never keys or prompts.
"""

from __future__ import annotations

import argparse
import logging
import os

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` (default INFO) and ``--log-format`` (default ``text``; env
    ``PAGEDSERVE_LOG_FORMAT``)."""
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=FORMATS,
                        default=os.environ.get("PAGEDSERVE_LOG_FORMAT") or "text",
                        help="text (default) or json: one JSON object a line "
                             "(env PAGEDSERVE_LOG_FORMAT)")


def configure_logging(level: str, log_format: str, service: str) -> None:
    """The root logger's one handler (stderr), in ``log_format``, for ``service``."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(
            "%(levelname)s %(name)s %(message)s", timestamp=True,
            rename_fields={"levelname": "level", "name": "logger"},
            static_fields={"service": service}))
    elif log_format == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}")
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(False)  # a second setup (tests, up in-process) starts afresh
    logging.captureWarnings(True)  # Python warnings (torch's, ...) in the same format
