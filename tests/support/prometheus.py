"""A real `prometheus` server for integration tests.

    with PrometheusServer(tmp_path, {"pagedserve-router": ["127.0.0.1:9400"]}) as prom:
        prom.wait_for_targets_up()
        value = prom.query_value("pagedserve_router_requests_total")

It scrapes every second, stores its TSDB under the given tmp dir, listens on a free
127.0.0.1 port, and is stopped (SIGTERM, then SIGKILL) on exit. The binary comes from
Debian's `prometheus` package (scripts/install_services.sh); tests skip without it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

SCRAPE_INTERVAL_S = 1


def prometheus_binary() -> str:
    """Path of the prometheus binary, or skip the calling test."""
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus not installed: `make test` installs it")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape_config(jobs: Mapping[str, Sequence[str]]) -> str:
    """prometheus.yml text scraping each job's host:port targets every second."""
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                   "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}
                           for job, targets in jobs.items()],
    }
    return json.dumps(config)  # JSON is YAML


class PrometheusServer:
    """Owns one prometheus process; ``stop()`` is idempotent and always reaps it."""

    def __init__(self, workdir: Path, jobs: Mapping[str, Sequence[str]]) -> None:
        self.workdir = Path(workdir)
        self.jobs = dict(jobs)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> Self:
        binary = prometheus_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(scrape_config(self.jobs))
        self.port = free_port()
        log = (self.workdir / "prometheus.log").open("wb")
        self._proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"prometheus not ready in {timeout_s}s: {self.log_tail()}")

    def log_tail(self, num_chars: int = 2000) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-num_chars:] if path.exists() else ""

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus API error: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; returns the vector result (list of {metric, value})."""
        data = self._get("/api/v1/query", {"query": promql})
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_value(self, promql: str) -> float | None:
        """The single sample value of a query, or None when the result is empty."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) != 1:
            raise ValueError(f"{promql!r} returned {len(result)} series")
        return float(result[0]["value"][1])

    def targets(self) -> list[dict[str, Any]]:
        data = self._get("/api/v1/targets", {"state": "active"})
        targets: list[dict[str, Any]] = data["activeTargets"]
        return targets

    def wait_for_targets_up(self, timeout_s: float = 30.0) -> None:
        """Poll until every configured target has been scraped successfully."""
        expected = sum(len(t) for t in self.jobs.values())
        deadline = time.monotonic() + timeout_s
        targets: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            targets = self.targets()
            if len(targets) == expected and all(t["health"] == "up" for t in targets):
                return
            time.sleep(0.2)
        raise TimeoutError(f"targets not up after {timeout_s}s: "
                           f"{[(t['scrapeUrl'], t['health'], t['lastError']) for t in targets]}")

    def wait_for_value(self, promql: str, expected: float, timeout_s: float = 15.0) -> float:
        """Poll ``promql`` until it equals ``expected`` (scrapes lag the exporter by ~1s)."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.query_value(promql)
            if value == expected:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"{promql!r} = {value}, expected {expected}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_prometheus(workdir: Path, jobs: Mapping[str, Sequence[str]]) -> PrometheusServer:
    """Start and return a server; the caller (usually a fixture) must ``stop()`` it."""
    return PrometheusServer(workdir, jobs).start()
