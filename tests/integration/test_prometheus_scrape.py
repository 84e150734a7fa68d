"""A real Prometheus scrapes pagedserve metrics servers and sees the values they export."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from pagedserve.core.metrics_server import serve_metrics
from scheduler.metrics import SchedulerMetrics
from tests.support.prometheus import PrometheusServer


@pytest.fixture
def exporters() -> Iterator[tuple[Counter, SchedulerMetrics, list[str]]]:
    plain, sched = CollectorRegistry(), CollectorRegistry()
    counter = Counter("pagedserve_test_events", "Events seen by the test.", registry=plain)
    metrics = SchedulerMetrics(sched)
    servers = [serve_metrics(0, plain), serve_metrics(0, sched)]
    try:
        yield counter, metrics, [f"127.0.0.1:{s.port}" for s in servers]
    finally:
        for server in servers:
            server.stop()


def test_prometheus_reads_counter_and_vllm_alias(tmp_path: Path, exporters) -> None:
    counter, metrics, (plain_addr, sched_addr) = exporters
    counter.inc(7)
    metrics.set_queue_sizes(running=3, waiting=5, swapped=0)
    metrics.set_kv_usage("worker-0", 0.25)
    jobs = {"test": [plain_addr], "pagedserve-scheduler": [sched_addr]}
    with PrometheusServer(tmp_path / "prom", jobs) as prom:
        prom.wait_for_targets_up()
        assert prom.wait_for_value('pagedserve_test_events_total{job="test"}', 7.0) == 7.0
        prom.wait_for_value("vllm:num_requests_waiting", 5.0)
        assert prom.query_value("pagedserve_scheduler_requests_waiting") == 5.0
        counter.inc(2)
        prom.wait_for_value("pagedserve_test_events_total", 9.0)
        usage = prom.query('vllm:kv_cache_usage_perc{worker="worker-0"}')
        assert float(usage[0]["value"][1]) == 0.25
    assert prom._proc is None
