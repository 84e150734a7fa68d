"""When each request is sent: offsets in seconds from the start of the run.

Inter-arrival gaps are gamma distributed with shape ``burstiness`` and mean ``1 / rate``:
``burstiness == 1`` is a Poisson process (exponential gaps), below 1 is burstier (clumps and
lulls), above 1 is smoother (towards a fixed interval). ``rate == inf`` sends everything at
once; a concurrency cap, if any, is applied on top by the runner.
"""

from __future__ import annotations

import math
import random


def validate_arrivals(rate: float, burstiness: float) -> None:
    if not rate > 0:
        raise ValueError(f"--rate must be > 0 (or inf), got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"--burstiness must be a positive number, got {burstiness}")


def inter_arrival_gaps(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """``num`` gaps in seconds; the i-th gap is the wait before request i."""
    validate_arrivals(rate, burstiness)
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)  # gamma mean = shape * scale = 1 / rate
    return [rng.gammavariate(burstiness, scale) for _ in range(num)]


def arrival_offsets(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times from the start of the run; the first request goes at 0."""
    gaps = inter_arrival_gaps(num, rate, burstiness, seed)
    offsets, t = [], 0.0
    for i, gap in enumerate(gaps):
        if i > 0:
            t += gap
        offsets.append(t)
    return offsets
