"""``--log-format`` (``pagedserve/core/logs.py``): text for people, one JSON object a line for a
log pipeline, with the fields a pipeline indexes on."""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Iterator

import pytest

from pagedserve.core.logs import add_logging_arguments, configure_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_level_logger_service_time_and_tracebacks(
        capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():  # pytest records warnings; here they must reach logging
        warnings.simplefilter("always")
        configure_logging("INFO", "json", "scheduler")
        log = logging.getLogger("scheduler.engine")
        log.debug("not at INFO")
        log.info("admitted %s", "req-1", extra={"request_id": "req-1"})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("step failed")
        warnings.warn("a library warning", UserWarning, stacklevel=1)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [r["message"] for r in lines[:2]] == ["admitted req-1", "step failed"]
    first, failed, warned = lines
    assert first["level"] == "INFO" and first["logger"] == "scheduler.engine"
    assert first["service"] == "scheduler" and first["request_id"] == "req-1"
    assert first["timestamp"].endswith("+00:00")
    assert failed["level"] == "ERROR" and "RuntimeError: boom" in failed["exc_info"]
    assert warned["logger"] == "py.warnings" and "a library warning" in warned["message"]


def test_text_is_one_readable_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "text", "router")
    logging.getLogger("router.server").info("router serving")
    assert capsys.readouterr().err.rstrip().endswith("INFO router.server: router serving")


def test_the_format_flag_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_LOG_FORMAT", "json")
    parser = argparse.ArgumentParser()
    add_logging_arguments(parser)
    assert parser.parse_args([]).log_format == "json"
    assert parser.parse_args(["--log-format", "text"]).log_format == "text"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-format", "xml"])
