"""Per-request measurements and their aggregation. Pure: no I/O, no clocks, no asyncio.

Definitions (all times in seconds inside, milliseconds in the summary):

- TTFT: send -> first streamed message carrying a token.
- ITL: the gap between consecutive token-carrying messages. A message with k > 1 tokens
  counts once (servers that coalesce deltas show fewer, longer gaps).
- TPOT: ``(e2e - ttft) / (num_output_tokens - 1)``; undefined for one output token.
- E2E: send -> end of the stream.
- Throughputs divide by the measured duration (first send to last completion).
- Goodput: completed requests per second that meet every given SLO. A request with one output
  token has no TPOT and meets any TPOT SLO.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

OK = "OK"
PERCENTILES = (50, 90, 99)
SLO_NAMES = ("ttft", "tpot", "e2e")


@dataclass
class RequestResult:
    """What one request did. ``status`` is ``OK`` or an error code: a gRPC status name such as
    ``RESOURCE_EXHAUSTED``, ``HTTP_429`` for the OpenAI backend, ``CANCELLED`` when the run's
    timeout cut it off, ``ERROR`` for anything else. Times are relative to the run start."""

    index: int
    status: str = OK
    start_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str = ""

    @property
    def is_ok(self) -> bool:
        return self.status == OK

    @property
    def tpot_s(self) -> float | None:
        if not self.is_ok or self.ttft_s is None or self.e2e_s is None:
            return None
        if self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "status": self.status,
            "start_s": self.start_s,
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "e2e_s": self.e2e_s,
            "itls_s": self.itls_s,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_output_tokens": self.num_output_tokens,
            "num_cached_tokens": self.num_cached_tokens,
            "error": self.error,
        }


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_NAMES:
            raise ValueError(f"--goodput: expected NAME:MS with NAME in {SLO_NAMES}, got {item!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {item!r}: {value!r} is not a number") from None
        if not slos[name] > 0:
            raise ValueError(f"--goodput: {item!r}: the limit must be > 0 ms")
    return slos


def percentile(sorted_values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) over a sorted list."""
    if not sorted_values:
        return math.nan
    rank = (len(sorted_values) - 1) * p / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


def distribution_ms(values_s: list[float]) -> dict[str, float]:
    """mean, p50, p90, p99 in milliseconds (NaN when there are no values)."""
    ms = sorted(v * 1000 for v in values_s)
    out = {"mean": sum(ms) / len(ms) if ms else math.nan}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(ms, p)
    return out


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    if not result.is_ok:
        return False
    values = {"ttft": result.ttft_s, "tpot": result.tpot_s, "e2e": result.e2e_s}
    for name, limit_ms in slos.items():
        value = values[name]
        if value is None:
            if name == "tpot":
                continue  # one output token: no decode phase to judge
            return False
        if value * 1000 > limit_ms:
            return False
    return True


def summarize(
    results: list[RequestResult], duration_s: float, slos: dict[str, float] | None = None
) -> dict[str, Any]:
    """Aggregates over measured (non-warmup) requests. ``duration_s`` is the divisor for rates."""
    ok = [r for r in results if r.is_ok]
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: math.nan)
    num_prompt = sum(r.num_prompt_tokens for r in ok)
    num_output = sum(r.num_output_tokens for r in ok)
    num_cached = sum(r.num_cached_tokens for r in ok)
    summary: dict[str, Any] = {
        "num_requests": len(results),
        "num_completed": len(ok),
        "num_failed": len(results) - len(ok),
        "failures_by_code": dict(sorted(Counter(r.status for r in results if not r.is_ok).items())),
        "duration_s": duration_s,
        "request_throughput": per_s(len(ok)),
        "output_token_throughput": per_s(num_output),
        "total_token_throughput": per_s(num_prompt + num_output),
        "total_prompt_tokens": num_prompt,
        "total_output_tokens": num_output,
        "total_cached_tokens": num_cached,
        "prefix_cache_hit_rate": num_cached / num_prompt if num_prompt else math.nan,
        "ttft_ms": distribution_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": distribution_ms([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": distribution_ms([itl for r in ok for itl in r.itls_s]),
        "e2e_ms": distribution_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
    }
    if slos:
        good = sum(1 for r in ok if meets_slos(r, slos))
        summary["slos_ms"] = dict(slos)
        summary["goodput"] = per_s(good)
        summary["num_good"] = good
    return summary
