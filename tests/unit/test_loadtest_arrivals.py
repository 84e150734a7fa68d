"""Arrival schedules: the mean gap is 1/rate; burstiness changes the spread, not the mean."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from pagedserve.loadtest.arrivals import arrival_offsets, inter_arrival_gaps


@pytest.mark.parametrize(
    ("rate", "burstiness"), [(10.0, 1.0), (2.5, 1.0), (10.0, 0.5), (10.0, 4.0)]
)
def test_mean_gap_matches_rate(rate: float, burstiness: float) -> None:
    gaps = inter_arrival_gaps(20_000, rate, burstiness, seed=7)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)


def test_poisson_gaps_have_cv_one_and_burstiness_sets_the_spread() -> None:
    # Gamma(shape k): coefficient of variation = 1 / sqrt(k).
    for burstiness in (0.5, 1.0, 4.0):
        gaps = inter_arrival_gaps(20_000, 5.0, burstiness, seed=1)
        cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
        assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_offsets_start_at_zero_increase_and_are_seeded() -> None:
    offsets = arrival_offsets(100, 20.0, 1.0, seed=3)
    assert offsets[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(offsets))
    assert offsets == arrival_offsets(100, 20.0, 1.0, seed=3)
    assert offsets != arrival_offsets(100, 20.0, 1.0, seed=4)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_offsets(5, math.inf, 1.0, seed=0) == [0.0] * 5


@pytest.mark.parametrize(
    ("rate", "burstiness"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, math.inf)]
)
def test_bad_rate_or_burstiness_rejected(rate: float, burstiness: float) -> None:
    with pytest.raises(ValueError):
        arrival_offsets(3, rate, burstiness, seed=0)
