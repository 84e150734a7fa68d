"""start_metrics_server binds a free port, serves vLLM colon names to Prometheus' Accept
header, and stops cleanly."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from pagedserve.core.metrics_server import start_metrics_server, stop_metrics_server
from scheduler.metrics import SchedulerMetrics

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def test_metrics_server_port_zero_serves_and_stops() -> None:
    registry = CollectorRegistry()
    SchedulerMetrics(registry).set_queue_sizes(running=2, waiting=0, swapped=0)
    port = start_metrics_server(0, registry)
    assert port > 0
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        request = urllib.request.Request(url, headers={"Accept": PROMETHEUS_ACCEPT})
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = resp.read().decode()
            assert resp.headers["Content-Type"].startswith("text/plain")
        assert "\nvllm:num_requests_running 2.0\n" in body
        assert "\npagedserve_scheduler_requests_running 2.0\n" in body
    finally:
        stop_metrics_server(port)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
