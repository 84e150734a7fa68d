"""Checks a load-test run's latency statistics against the timestamps the harness itself took,
so no test has to compare a measured time with a wall-clock threshold.

``RecordedTimings`` wraps the harness's per-request recorder (``backends._Recorder``) and keeps
each request's send time and the arrival time of every token-carrying message, exactly the
clock readings the harness computed its figures from. ``check_latencies`` recomputes TTFT, ITL,
TPOT and their summary distributions from those readings, independently of
``pagedserve.loadtest.metrics`` (percentiles by ``statistics.quantiles``), and compares: it fails
if the harness measured TTFT from the wrong point, counted the first gap as an ITL, left a gap
out, or aggregated with the wrong values or denominators, however fast or slow the machine.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass
from typing import Any

import pytest

from pagedserve.loadtest import backends
from pagedserve.loadtest.metrics import OK, RequestResult


@dataclass(frozen=True)
class Timestamps:
    """One request as the harness clocked it (``time.perf_counter()`` values)."""

    sent: float
    token_times: tuple[float, ...]


class RecordedTimings:
    """Install with ``RecordedTimings(monkeypatch)`` before the run; ``by_index`` then maps each
    request index (warmup included) to its ``Timestamps``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by_index: dict[int, Timestamps] = {}
        by_index = self.by_index

        class Recorder(backends._Recorder):
            def finish(self, status: str = OK, error: str = "") -> RequestResult:
                by_index[self.spec.index] = Timestamps(self.sent, tuple(self.token_times))
                return super().finish(status, error)

        monkeypatch.setattr(backends, "_Recorder", Recorder)


def distribution_ms(values_s: list[float]) -> dict[str, float]:
    """mean, p50, p90, p99 in ms; percentiles interpolate linearly between closest ranks."""
    ms = [v * 1000 for v in values_s]
    cuts = statistics.quantiles(ms, n=100, method="inclusive")  # cuts[k - 1] is the k-th
    return {"mean": statistics.fmean(ms), "p50": cuts[49], "p90": cuts[89], "p99": cuts[98]}


def check_latencies(payload: dict[str, Any], timings: RecordedTimings,
                    tokens_per_message: int = 1) -> None:
    """Every completed request's TTFT, ITLs and TPOT, and the summary's ``ttft_ms``, ``itl_ms``,
    ``tpot_ms`` and ``e2e_ms``, equal what the recorded timestamps give. The fake servers send
    ``tokens_per_message`` tokens per streamed message."""
    ok = [r for r in payload["results"] if r["status"] == OK]
    assert len(ok) >= 2, "too few completed requests to compare distributions"
    ttfts, itls, tpots = [], [], []
    for r in ok:
        t = timings.by_index[r["index"]]
        n = r["num_output_tokens"]
        assert len(t.token_times) * tokens_per_message == n, r
        ttft = t.token_times[0] - t.sent
        gaps = [b - a for a, b in itertools.pairwise(t.token_times)]
        assert r["ttft_s"] == pytest.approx(ttft, rel=1e-9, abs=1e-12), r
        assert r["itls_s"] == pytest.approx(gaps, rel=1e-9, abs=1e-12), r
        assert r["e2e_s"] >= t.token_times[-1] - t.sent  # the stream ends after its last token
        ttfts.append(ttft)
        itls += gaps
        if n < 2:
            assert r["tpot_s"] is None, r  # no decode phase
            continue
        tpots.append((r["e2e_s"] - ttft) / (n - 1))
        assert r["tpot_s"] == pytest.approx(tpots[-1], rel=1e-9, abs=1e-12), r
    s = payload["summary"]
    expected = {"ttft_ms": ttfts, "itl_ms": itls, "tpot_ms": tpots,
                "e2e_ms": [r["e2e_s"] for r in ok]}
    for name, values in expected.items():
        assert s[name] == pytest.approx(distribution_ms(values), rel=1e-9, abs=1e-9), name
