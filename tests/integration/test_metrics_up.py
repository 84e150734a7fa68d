"""``pagedserve up --metrics`` prints one /metrics URL per process, and each process serves it
with real counts (separate router, scheduler and worker processes)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.promql import scraped_samples
from tests.support.tiny_llama import tiny_llama_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _page(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return scraped_samples(resp.read().decode())


def test_up_with_metrics_prints_and_serves_every_services_metrics(tmp_path: Path) -> None:
    port = _free_port()
    log_path = tmp_path / "up.log"
    with log_path.open("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.cli", "up", "--model", str(tiny_llama_dir()),
             "--port", str(port), "--http-port", "0", "--kv-cache-memory-gib", "0.01", "--metrics",
             "--log-level", "WARNING"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "pagedserve is up" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "cluster did not start"
            time.sleep(0.3)
        urls = dict(re.findall(r"^metrics: (\S+) (http://\S+/metrics)$", log_path.read_text(),
                               re.MULTILINE))
        assert set(urls) == {"worker-0", "scheduler", "router"}, log_path.read_text()
        out = subprocess.run(
            [sys.executable, "-m", "pagedserve.cli", "generate", "--address", f"127.0.0.1:{port}",
             "--raw", "--max-tokens", "6", "--ignore-eos", "hello world"],
            check=False, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        ok = ("pagedserve_router_requests_total",
              frozenset({("protocol", "grpc"), ("outcome", "ok"), ("code", "OK")}))
        deadline = time.monotonic() + 10
        while _page(urls["router"]).get(ok) != 1:
            assert time.monotonic() < deadline, "router did not count the request"
            time.sleep(0.1)
        assert _page(urls["router"])[("pagedserve_router_generated_tokens_total",
                                      frozenset({("protocol", "grpc")}))] == 6
        scheduler = _page(urls["scheduler"])
        assert scheduler[("pagedserve_scheduler_generated_tokens_total", frozenset())] == 6
        worker = _page(urls["worker-0"])
        rank = frozenset({("rank", "0")})
        assert worker[("pagedserve_worker_sampled_tokens_total", rank)] == 6
        assert worker[("pagedserve_worker_kv_blocks_total", rank)] > 0
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("pagedserve up did not stop on Ctrl-C")
