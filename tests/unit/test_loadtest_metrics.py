"""Aggregation on hand-made timings: percentiles, TPOT, throughput, goodput, failures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pagedserve.loadtest.metrics import (
    RequestResult,
    distribution_ms,
    meets_slos,
    parse_slos,
    percentile,
    summarize,
)


def _ok(index: int, ttft: float, e2e: float, n_out: int, **kw) -> RequestResult:
    return RequestResult(index=index, ttft_s=ttft, e2e_s=e2e, num_output_tokens=n_out, **kw)


def test_percentile_matches_numpy_linear_interpolation() -> None:
    values = sorted([3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.3])
    for p in (0, 10, 50, 90, 99, 100):
        assert percentile(values, p) == pytest.approx(np.percentile(values, p))
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_distribution_is_in_milliseconds() -> None:
    d = distribution_ms([0.001, 0.002, 0.003, 0.004])
    assert d["mean"] == pytest.approx(2.5)
    assert d["p50"] == pytest.approx(2.5)
    assert d["p90"] == pytest.approx(3.7)
    assert d["p99"] == pytest.approx(3.97)


def test_tpot_excludes_first_token_and_is_undefined_for_one_token() -> None:
    assert _ok(0, ttft=0.1, e2e=0.5, n_out=5).tpot_s == pytest.approx(0.1)
    assert _ok(0, ttft=0.1, e2e=0.1, n_out=1).tpot_s is None
    assert RequestResult(index=0, status="RESOURCE_EXHAUSTED").tpot_s is None


def test_summary_counts_throughputs_and_failures() -> None:
    results = [
        _ok(0, 0.1, 1.1, 11, num_prompt_tokens=100, num_cached_tokens=32, itls_s=[0.1] * 10),
        _ok(1, 0.3, 0.3, 1, num_prompt_tokens=50),
        RequestResult(index=2, status="RESOURCE_EXHAUSTED", num_prompt_tokens=70),
        RequestResult(index=3, status="RESOURCE_EXHAUSTED"),
        RequestResult(index=4, status="DEADLINE_EXCEEDED"),
    ]
    s = summarize(results, duration_s=2.0)
    assert (s["num_requests"], s["num_completed"], s["num_failed"]) == (5, 2, 3)
    assert s["failures_by_code"] == {"DEADLINE_EXCEEDED": 1, "RESOURCE_EXHAUSTED": 2}
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_token_throughput"] == pytest.approx(6.0)  # 12 tokens / 2 s
    assert s["total_token_throughput"] == pytest.approx(81.0)  # (150 + 12) / 2 s
    assert s["total_cached_tokens"] == 32
    assert s["prefix_cache_hit_rate"] == pytest.approx(32 / 150)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0)  # only request 0 has a TPOT
    assert s["itl_ms"]["p99"] == pytest.approx(100.0)
    assert s["e2e_ms"]["p90"] == pytest.approx(300 + 0.9 * 800)
    assert "goodput" not in s


def test_goodput_counts_requests_meeting_every_slo() -> None:
    results = [
        _ok(0, ttft=0.05, e2e=0.95, n_out=10),  # tpot 100 ms
        _ok(1, ttft=0.05, e2e=0.50, n_out=10),  # tpot 50 ms
        _ok(2, ttft=0.40, e2e=0.40, n_out=1),  # no tpot, ttft too slow
        _ok(3, ttft=0.10, e2e=0.10, n_out=1),  # no tpot: meets the tpot SLO
        RequestResult(index=4, status="UNAVAILABLE"),
    ]
    slos = parse_slos(["ttft:200", "tpot:60"])
    assert [meets_slos(r, slos) for r in results] == [False, True, False, True, False]
    s = summarize(results, duration_s=4.0, slos=slos)
    assert s["num_good"] == 2
    assert s["goodput"] == pytest.approx(0.5)
    assert summarize(results, 4.0, parse_slos(["e2e:500"]))["num_good"] == 3


def test_empty_or_all_failed_run_gives_nan_latencies_not_errors() -> None:
    s = summarize([RequestResult(index=0, status="UNAVAILABLE")], duration_s=0.0)
    assert s["num_completed"] == 0
    assert math.isnan(s["ttft_ms"]["p50"]) and math.isnan(s["request_throughput"])


@pytest.mark.parametrize("bad", ["ttft", "latency:5", "ttft:abc", "tpot:-1", "e2e:0"])
def test_bad_slo_specs_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="--goodput"):
        parse_slos([bad])
