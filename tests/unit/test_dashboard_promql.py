"""Every dashboard query parses and reads only metrics the services really export."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from router.metrics import RouterMetrics
from scheduler.metrics import SchedulerMetrics
from tests.support.promql import exported_names, grafana_to_promql, metric_names
from worker.metrics import WorkerMetrics

pytestmark = pytest.mark.external  # a service binary, the packaged model or a subprocess

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/pagedserve.json"
CHART_COPY = ROOT / "deploy/helm/pagedserve/dashboards/pagedserve.json"
#: Series Prometheus itself synthesizes per target.
SYNTHETIC = {"up"}


def _exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _exported() -> set[str]:
    registries = [CollectorRegistry() for _ in range(3)]
    RouterMetrics(registries[0])
    SchedulerMetrics(registries[1])
    WorkerMetrics(registries[2])
    return exported_names(registries) | SYNTHETIC


def test_dashboard_has_the_four_rows() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Overview", "Scheduler", "KV memory per worker", "Worker health"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not installed: `make test` installs it")
    rules: list[dict[str, Any]] = [
        {"record": f"dashboard:expr_{i}", "expr": grafana_to_promql(e)}
        for i, e in enumerate(_exprs())]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], check=False,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_expressions_name_only_exported_metrics() -> None:
    exported = _exported()
    used = set().union(*(metric_names(grafana_to_promql(e)) for e in _exprs()))
    assert used, "no metric names found"
    assert used <= exported, sorted(used - exported)


def test_metric_name_extraction_ignores_labels_functions_and_grouping() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, op) (rate(a_bucket{job="x:y"}[5m]))) '
            '/ on (op) group_left b_total')
    assert metric_names(expr) == {"a_bucket", "b_total"}


def test_chart_ships_the_same_dashboard_as_the_generator_writes() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_dashboard",
                                                  ROOT / "deploy/grafana/build_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.render()
    assert DASHBOARD.read_text() == text, "run python deploy/grafana/build_dashboard.py"
    assert CHART_COPY.read_text() == text, "run python deploy/grafana/build_dashboard.py"


def test_router_panels_split_by_protocol() -> None:
    """HTTP (OpenAI API) and gRPC requests are told apart on every router panel."""
    router_exprs = [e for e in _exprs() if "pagedserve_router_" in e]
    assert router_exprs
    for expr in router_exprs:
        assert "protocol" in expr, expr
    registry = CollectorRegistry()
    RouterMetrics(registry)
    samples = [s for family in registry.collect() for s in family.samples
               if s.name.startswith("pagedserve_router_")]
    assert samples and all("protocol" in s.labels for s in samples)
