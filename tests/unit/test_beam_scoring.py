"""Beam scoring never raises for the batch: extreme length penalties and non-finite log-probs
rank the affected candidate last (issue 15: one request took down its worker)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pagedserve.core.step import SampledRow
from scheduler.beam_search import BeamState, length_normalized
from scheduler.sequence import Sequence

STOP = 0


def _beams(num_outputs: int) -> list[Sequence]:
    return [Sequence(seq_id=i, index=0, token_ids=[5, 6, *[9] * num_outputs], num_prompt_tokens=2)
            for i in (1, 2)]


@pytest.mark.parametrize("length_penalty", [-2000.0, 3.4e38, -3.4e38, math.inf, math.nan])
def test_extreme_length_penalties_finish_the_search_without_raising(length_penalty: float
                                                                     ) -> None:
    state = BeamState(2, length_penalty, False, {STOP}, max_tokens=4)
    for step in range(4):
        seqs = _beams(step)
        tops = [(STOP, -0.5), (3, -1.0), (4, -1.5), (8, -2.0)]
        running = state.step([(s, SampledRow(s.seq_id, 3, -1.0, tops)) for s in seqs])
        for seq, cont in zip(seqs, running, strict=False):
            state.scores[seq.seq_id] = cont.score
        if state.done:
            break
    assert state.done
    assert all(len(h.output_token_ids) >= 1 for h in state.best(2))


def test_non_finite_log_probs_rank_last() -> None:
    state = BeamState(2, 1.0, False, {STOP}, max_tokens=8)
    seqs = _beams(0)
    tops = [(3, math.nan), (4, -math.inf), (8, -1.0), (9, -2.0)]
    running = state.step([(s, SampledRow(s.seq_id, 3, -1.0, tops)) for s in seqs])
    assert [c.token_id for c in running] == [8, 8]


def test_length_normalized_is_hf_arithmetic_or_minus_inf() -> None:
    assert length_normalized(np.float32(-3.0), 4, 1.0) == float(np.float32(-3.0) / np.float32(4))
    assert length_normalized(-3.0, 4, 2.0, fp32=False) == -3.0 / 16
    assert length_normalized(-3.0, 4, 3.4e38) == -math.inf
    assert length_normalized(-3.0, 4, -2000.0) == -math.inf
