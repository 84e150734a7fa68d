"""A real worker process started with ``--log-format json`` writes nothing on stdout or stderr
but JSON records (its start, its kernels, its shutdown), each naming the service: what a log
pipeline on Kubernetes ingests line by line (``logFormat: json`` in the chart)."""

from __future__ import annotations

import json

import pytest

from tests.support.tiny_llama import tiny_llama_dir
from tests.support.tp_group import start_worker_ranks

pytestmark = pytest.mark.external  # a worker process


def test_a_worker_logging_json_writes_only_json_records() -> None:
    ranks = start_worker_ranks(tiny_llama_dir(), 1,
                               extra_args=("--num-gpu-blocks", "16", "--log-format", "json"))
    try:
        ranks.wait_ready()
    finally:
        ranks.stop()
    assert ranks.procs[0].returncode == 0
    lines = (ranks.log_dir / "rank0.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]  # raises on any other line
    assert records and all(r["service"] == "worker" and r["level"] and r["logger"]
                           for r in records)
    messages = " | ".join(r["message"] for r in records)
    assert "cpu kernels:" in messages and "worker stopping" in messages
