"""Alert rules are valid, read exported metrics, and fire when they should (promtool test)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from router.metrics import RouterMetrics
from scheduler.metrics import SchedulerMetrics
from tests.support.promql import exported_names, metric_names
from worker.metrics import WorkerMetrics

pytestmark = pytest.mark.external  # a service binary, the packaged model or a subprocess

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy/prometheus/alerts.yaml"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not installed: `make test` installs it")
    return path


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], check=False, capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_promtool_check_rules_passes() -> None:
    result = _run("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_read_only_exported_metrics() -> None:
    registries = [CollectorRegistry() for _ in range(3)]
    RouterMetrics(registries[0])
    SchedulerMetrics(registries[1])
    WorkerMetrics(registries[2])
    exported = exported_names(registries) | {"up"}
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    for rule in rules:
        assert metric_names(rule["expr"]) <= exported, rule["alert"]


UNIT_TESTS = """
rule_files: [alerts.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'pagedserve_scheduler_kv_cache_usage_ratio{worker="w0"}'
        values: '0.97x10'
      - series: 'pagedserve_scheduler_kv_cache_usage_ratio{worker="w1"}'
        values: '0.50x10'
      - series: 'up{job="pagedserve-worker", instance="w0:9402"}'
        values: '1 1 0 0 0 0 0 0'
      - series: 'pagedserve_scheduler_preemptions_total{mode="swap"}'
        values: '0+600x20'
    alert_rule_test:
      - eval_time: 6m
        alertname: PagedserveKVCacheNearlyFull
        exp_alerts:
          - exp_labels: {severity: warning, worker: w0}
            exp_annotations:
              summary: KV cache of worker w0 is over 95% full
              description: Requests will queue or be preempted; add workers or lower max batch size.
      - eval_time: 6m
        alertname: PagedserveWorkerDown
        exp_alerts:
          - exp_labels: {severity: critical, job: pagedserve-worker, instance: "w0:9402"}
            exp_annotations:
              summary: Worker w0:9402 is down
              description: Prometheus cannot scrape this worker; the scheduler re-places
                its requests.
      - eval_time: 6m
        alertname: PagedserveNoWorkers
        exp_alerts:
          - exp_labels: {severity: critical}
            exp_annotations:
              summary: No pagedserve worker is up
              description: No worker target is scraped successfully; generation is unavailable.
      - eval_time: 3m
        alertname: PagedserveHighPreemptionRate
        exp_alerts: []
      - eval_time: 16m
        alertname: PagedserveHighPreemptionRate
        exp_alerts:
          - exp_labels: {severity: warning}
            exp_annotations:
              summary: Scheduler preempts 10 sequence groups/s
              description: KV memory is thrashing (swap/recompute); throughput and latency suffer.
"""


def test_alerts_fire_on_synthetic_series(tmp_path: Path) -> None:
    shutil.copy(ALERTS, tmp_path / "alerts.yaml")
    (tmp_path / "alerts_test.yaml").write_text(UNIT_TESTS)
    result = _run("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
