"""Build the pagedserve Grafana dashboard.

Writes deploy/grafana/pagedserve.json and the copy the Helm chart ships
(deploy/helm/pagedserve/dashboards/pagedserve.json). Edit panels here, then run
``python deploy/grafana/build_dashboard.py``; tests fail if either JSON file drifts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = (ROOT / "deploy/grafana/pagedserve.json",
           ROOT / "deploy/helm/pagedserve/dashboards/pagedserve.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
QUANTILES = (0.5, 0.9, 0.99)


def quantiles(metric: str, by: str = "le") -> list[tuple[str, str]]:
    """p50/p90/p99 of a histogram, one target each."""
    expr = "histogram_quantile({q}, sum by ({by}) (rate({m}_bucket[{r}])))"
    extra = by.replace("le", "").strip(", ")
    suffix = f" {{{{{extra}}}}}" if extra else ""
    return [(expr.format(q=q, by=by, m=metric, r=RATE), f"p{int(q * 100)}{suffix}")
            for q in QUANTILES]


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short",
          kind: str = "timeseries", width: int = 8) -> dict[str, Any]:
    return {
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": width, "x": 0, "y": 0},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                     "datasource": DATASOURCE} for i, (expr, legend) in enumerate(targets)],
    }


def info_table(title: str, metric: str, columns: list[str]) -> dict[str, Any]:
    """An info series' labels as a table, one row per scrape target (instant query)."""
    p = panel(title, [(metric, "")], kind="table")
    for target in p["targets"]:
        target.update(format="table", instant=True)
    p["transformations"] = [{"id": "filterFieldsByName",
                             "options": {"include": {"names": columns}}}]
    return p


def overview() -> list[dict[str, Any]]:
    """What clients see, per protocol (``grpc``: the Generation service; ``http``: the
    OpenAI-compatible API), so the two are compared on the same panels."""
    r = "pagedserve_router"
    by = "le, protocol"
    return [
        panel("Requests/s by protocol and outcome",
              [(f"sum by (protocol, outcome) (rate({r}_requests_total[{RATE}]))",
                "{{protocol}} {{outcome}}")], "reqps"),
        panel("Time to first token", quantiles(f"{r}_time_to_first_token_seconds", by), "s"),
        panel("Time per output token", quantiles(f"{r}_time_per_output_token_seconds", by), "s"),
        panel("Inter-token latency", quantiles(f"{r}_inter_token_latency_seconds", by), "s"),
        panel("End-to-end latency", quantiles(f"{r}_e2e_request_latency_seconds", by), "s"),
        panel("Tokens/s",
              [(f"sum by (protocol) (rate({r}_prompt_tokens_total[{RATE}]))",
                "prompt {{protocol}}"),
               (f"sum by (protocol) (rate({r}_generated_tokens_total[{RATE}]))",
                "generated {{protocol}}")]),
        panel("Requests in flight", [(f"sum by (protocol) ({r}_streams_in_flight)",
                                      "{{protocol}}")]),
    ]


def scheduler() -> list[dict[str, Any]]:
    s = "pagedserve_scheduler"
    return [
        panel("Queues", [(f"sum({s}_requests_running)", "running"),
                         (f"sum({s}_requests_waiting)", "waiting"),
                         (f"sum({s}_requests_swapped)", "swapped")]),
        panel("Preemptions/s by mode",
              [(f"sum by (mode) (rate({s}_preemptions_total[{RATE}]))", "{{mode}}")]),
        panel("Prefix cache hit rate (tokens)",
              [((f"sum(rate({s}_prefix_cache_hit_tokens_total[{RATE}])) / "
                 f"clamp_min(sum(rate({s}_prefix_cache_queried_tokens_total[{RATE}])), 1)"),
                "hit rate")], "percentunit"),
        panel("Step duration", quantiles(f"{s}_step_duration_seconds"), "s"),
        panel("Placements/s by reason",
              [(f"sum by (reason) (rate({s}_placements_total[{RATE}]))", "{{reason}}")]),
        panel("kvstore latency p99 and errors/s",
              [((f"histogram_quantile(0.99, sum by (le, op) "
                 f"(rate({s}_kvstore_operation_duration_seconds_bucket[{RATE}])))"), "p99 {{op}}"),
               (f"sum by (op) (rate({s}_kvstore_errors_total[{RATE}]))", "errors {{op}}")]),
    ]


def kv_memory() -> list[dict[str, Any]]:
    w = "pagedserve_worker"
    return [
        panel("KV usage per worker (scheduler view)",
              [("pagedserve_scheduler_kv_cache_usage_ratio", "{{worker}}")], "percentunit"),
        # Which block is used is scheduler metadata; workers export only their pool capacity.
        panel("KV blocks per worker (scheduler view)",
              [("sum by (worker, state) (pagedserve_scheduler_kv_blocks)",
                "{{state}} {{worker}}"),
               (f"{w}_kv_blocks_total", "capacity {{instance}}")]),
        panel("Swap usage per worker (scheduler view)",
              [(('sum by (worker) (pagedserve_scheduler_swap_blocks{state="used"}) / '
                 "clamp_min(sum by (worker) (pagedserve_scheduler_swap_blocks), 1)"),
                "{{worker}}")],
              "percentunit"),
        panel("Device memory per worker pod",
              [(f"{w}_device_memory_allocated_bytes", "allocated {{instance}}"),
               (f"{w}_device_memory_reserved_bytes", "reserved {{instance}}"),
               (f"{w}_device_memory_total_bytes", "total {{instance}}"),
               (f"{w}_model_weight_bytes", "weights {{instance}}")], "bytes"),
    ]


def worker_health() -> list[dict[str, Any]]:
    w = "pagedserve_worker"
    return [
        panel("Workers up", [('sum(up{job="pagedserve-worker"})', "up"),
                             ("pagedserve_scheduler_workers_healthy", "healthy (scheduler)")],
              kind="stat"),
        panel("Forward time per step", quantiles(f"{w}_forward_duration_seconds", "le, instance"),
              "s"),
        panel("Sampling time per step p99",
              [((f"histogram_quantile(0.99, sum by (le, instance) "
                 f"(rate({w}_sampling_duration_seconds_bucket[{RATE}])))"), "{{instance}}")], "s"),
        panel("Attention backend", [(f"{w}_attention_backend_info", "{{backend}} on {{device}}")],
              kind="table"),
        info_table("CPU kernels and weight format per worker (off = torch ops, none = GPU)",
                   f"{w}_cpu_kernels_info", ["instance", "isa", "available", "weights"]),
    ]


def layout(rows: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Place rows top to bottom, three 8-wide panels per line; ids are sequential."""
    panels: list[dict[str, Any]] = []
    y = 0
    for title, row_panels in rows:
        panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        y += 1
        for i, p in enumerate(row_panels):
            p["gridPos"].update(x=(i % 3) * 8, y=y + (i // 3) * 8)
        y += ((len(row_panels) + 2) // 3) * 8
        panels.extend(row_panels)
    for panel_id, p in enumerate(panels, start=1):
        p["id"] = panel_id
    return panels


def dashboard() -> dict[str, Any]:
    rows = [("Overview", overview()), ("Scheduler", scheduler()),
            ("KV memory per worker", kv_memory()), ("Worker health", worker_health())]
    return {
        "uid": "pagedserve",
        "title": "pagedserve",
        "tags": ["pagedserve", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "editable": True,
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0}]},
        "annotations": {"list": []},
        "panels": layout(rows),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    text = render()
    for path in OUTPUTS:
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
