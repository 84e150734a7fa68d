"""Output of a load test: the end-of-run table, the sweep table, the JSON file and the plots.

Plots need matplotlib (the ``bench`` extra); it is imported only when a plot is asked for, with
the non-interactive Agg backend.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pagedserve.loadtest.metrics import RequestResult

_DISTRIBUTIONS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(summary: dict[str, Any], title: str = "pagedserve loadtest") -> str:
    """A two-column text table of one run's aggregates."""
    rows: list[tuple[str, str]] = [
        ("Requests (completed / sent)", f"{summary['num_completed']} / {summary['num_requests']}"),
        ("Failed", str(summary["num_failed"])),
    ]
    rows += [(f"  {code}", str(n)) for code, n in summary["failures_by_code"].items()]
    if summary.get("num_not_sent"):
        rows.append(("Not sent (run timeout)", str(summary["num_not_sent"])))
    rows += [
        ("Duration (s)", _fmt(summary["duration_s"])),
        ("Request throughput (req/s)", _fmt(summary["request_throughput"])),
        ("Output token throughput (tok/s)", _fmt(summary["output_token_throughput"])),
        ("Total token throughput (tok/s)", _fmt(summary["total_token_throughput"])),
        (
            "Prompt / output tokens",
            f"{summary['total_prompt_tokens']} / {summary['total_output_tokens']}",
        ),
        (
            "Cached prompt tokens",
            f"{summary['total_cached_tokens']} ({_fmt(100 * summary['prefix_cache_hit_rate'])}%)",
        ),
    ]
    if "goodput" in summary:
        slos = " ".join(f"{k}<={v:g}ms" for k, v in summary["slos_ms"].items())
        rows.append((f"Goodput (req/s, {slos})", _fmt(summary["goodput"])))
    for key, label in _DISTRIBUTIONS:
        d = summary[key]
        rows.append(
            (
                f"{label} ms mean / p50 / p90 / p99",
                " / ".join(_fmt(d[k]) for k in ("mean", "p50", "p90", "p99")),
            )
        )
    width = max(len(name) for name, _ in rows)
    line = "=" * (width + 30)
    body = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
    return f"{line}\n{title}\n{line}\n{body}\n{line}"


_SWEEP_COLUMNS = (
    ("rate", "rate", lambda p: _fmt(p["rate"])),
    ("ok", "ok", lambda p: f"{p['summary']['num_completed']}/{p['summary']['num_requests']}"),
    ("req/s", "request_throughput", None),
    ("out tok/s", "output_token_throughput", None),
    ("TTFT p50", "ttft_ms.p50", None),
    ("TTFT p99", "ttft_ms.p99", None),
    ("TPOT p50", "tpot_ms.p50", None),
    ("TPOT p99", "tpot_ms.p99", None),
    ("E2E p50", "e2e_ms.p50", None),
    ("goodput", "goodput", None),
)


def _lookup(summary: dict[str, Any], dotted: str) -> Any:
    value: Any = summary
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def format_sweep_table(points: list[dict[str, Any]]) -> str:
    """One row per rate: ``points`` are ``{"rate": r, "summary": {...}}``; latencies in ms."""
    header = [name for name, _, _ in _SWEEP_COLUMNS]
    rows = [
        [fn(p) if fn else _fmt(_lookup(p["summary"], key)) for _, key, fn in _SWEEP_COLUMNS]
        for p in points
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _json_safe(value: Any) -> Any:
    """NaN and inf are not JSON: NaN becomes null, inf the string "inf"."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'pagedserve[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax: Any, values_s: list[float], label: str) -> None:
    ms = sorted(v * 1000 for v in values_s)
    if ms:
        ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], label=label)


def plot_run(path: str | Path, results: list[RequestResult], title: str = "") -> None:
    """Latency CDFs (TTFT, TPOT, ITL, E2E) and a per-request timeline (send -> first token ->
    end, failures in red) in one PNG."""
    plt = _pyplot()
    ok = [r for r in results if r.is_ok]
    fig, (ax_cdf, ax_time) = plt.subplots(1, 2, figsize=(14, 5.5))
    _cdf(ax_cdf, [r.ttft_s for r in ok if r.ttft_s is not None], "TTFT")
    _cdf(ax_cdf, [t for r in ok if (t := r.tpot_s) is not None], "TPOT")
    _cdf(ax_cdf, [x for r in ok for x in r.itls_s], "ITL")
    _cdf(ax_cdf, [r.e2e_s for r in ok if r.e2e_s is not None], "E2E")
    ax_cdf.set(
        xscale="log", xlabel="latency (ms)", ylabel="fraction of requests", title="Latency CDFs"
    )
    ax_cdf.grid(True, which="both", alpha=0.3)
    ax_cdf.legend()
    _timeline(ax_time, results)
    fig.suptitle(title or f"{len(ok)}/{len(results)} requests completed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _timeline(ax: Any, results: list[RequestResult]) -> None:
    for row, r in enumerate(results):
        if r.is_ok and r.e2e_s is not None:
            first = r.start_s + (r.ttft_s or 0.0)
            ax.plot([r.start_s, first], [row, row], color="tab:orange", lw=1.5)
            ax.plot([first, r.start_s + r.e2e_s], [row, row], color="tab:blue", lw=1.5)
        else:
            ax.plot([r.start_s], [row], "x", color="tab:red", ms=4)
    ax.plot([], [], color="tab:orange", label="waiting for first token")
    ax.plot([], [], color="tab:blue", label="decoding")
    ax.plot([], [], "x", color="tab:red", label="failed")
    ax.set(xlabel="time since start (s)", ylabel="request", title="Per-request timeline")
    ax.legend(loc="lower right")


def plot_sweep(path: str | Path, points: list[dict[str, Any]]) -> None:
    """Output throughput against TTFT, TPOT and E2E (p50 solid, p99 dashed), one point per rate."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    xs = [p["summary"]["output_token_throughput"] for p in points]
    for ax, (key, label) in zip(
        axes, (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E")), strict=True
    ):
        for pct, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(xs, [p["summary"][key][pct] for p in points], style, label=f"{label} {pct}")
        for x, p in zip(xs, points, strict=True):
            ax.annotate(f"{_fmt(p['rate'], 1)}/s", (x, p["summary"][key]["p50"]), fontsize=7)
        ax.set(
            xlabel="output throughput (tok/s)",
            ylabel=f"{label} (ms)",
            title=f"{label} vs throughput",
        )
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("Rate sweep (labels: request rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
