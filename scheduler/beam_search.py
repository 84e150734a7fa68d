"""Beam search over shared blocks, with the semantics of Hugging Face ``generate(num_beams=W)``.

Each step every running beam is computed once and the worker returns its top ``2W`` log-probs
(log-softmax of the raw logits). Of the ``2W`` best continuations over all beams:
- one that ends (a stop token, EOS included unless ignored, or reaching ``max_tokens``) and
  ranks in the top ``W`` becomes a finished hypothesis, scored
  ``cumulative / generated_len ** length_penalty``; the best ``W`` are kept;
- the best ``W`` that do not end are next step's beams.
The scheduler turns "beam b continues with token t" into block-table operations: the first
continuation of a beam reuses its sequence, each further one *forks* it (all blocks shared, ref
counts up; copy-on-write when the shared partial last block is written), and a beam with no
continuation is freed. Search stops when no running beam can beat the worst finished hypothesis
(HF's ``early_stopping=False`` heuristic), when all are finished and ``early_stopping`` is set, or
when every continuation ends.

Scores are per beam and never raise: a non-finite log-prob or length normalisation (parameters
that bypassed validation, ``pagedserve/core/sampling.py``) ranks that candidate last instead of
failing the step for every request on the worker.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np

from pagedserve.core.step import SampledRow
from scheduler.sequence import Sequence

_NEG = np.float32(-1.0e9)


@dataclass
class Hypothesis:
    score: float
    output_token_ids: list[int]
    ended_with_eos: bool
    cumulative_logprob: float


@dataclass
class Continuation:
    parent: Sequence
    token_id: int
    score: np.float32  # cumulative log-prob of the beam after this token (-1e9 if it ended)


@dataclass
class BeamState:
    width: int
    length_penalty: float
    early_stopping: bool
    stop_token_ids: Collection[int]  # the request's stop set (EOS included unless ignored)
    max_tokens: int
    finished: list[Hypothesis] = field(default_factory=list)
    scores: dict[int, np.float32] = field(default_factory=dict)  # seq_id -> running score
    improvable: bool = True
    done: bool = False

    def step(self, sampled: Seq[tuple[Sequence, SampledRow]]) -> list[Continuation]:
        """Consumes one step's top log-probs of every running beam; returns the next beams."""
        candidates = self._top_candidates(sampled)
        gen_len = sampled[0][0].num_output_tokens + 1  # after this step's token
        ends = [c.token_id in self.stop_token_ids or gen_len >= self.max_tokens for c in candidates]
        running = self._next_running(candidates, ends)
        self._update_finished(candidates, ends, gen_len)
        self.scores = {}  # the caller records the sequence that carries each continuation
        best_running = running[0].score if running else _NEG
        self.improvable = self.improvable and self._is_improvable(best_running, gen_len)
        all_full = len(self.finished) == self.width
        self.done = (not self.improvable or (all_full and self.early_stopping) or all(ends))
        return running

    def score_of(self, seq: Sequence) -> np.float32:
        return self.scores.get(seq.seq_id, np.float32(0.0))

    def best(self, n: int) -> list[Hypothesis]:
        return self.finished[:n]

    # ---- internals ---------------------------------------------------------------------------
    def _top_candidates(
        self, sampled: Seq[tuple[Sequence, SampledRow]]
    ) -> list[Continuation]:
        pool = []
        for order, (seq, token) in enumerate(sampled):
            base = self.score_of(seq)
            for rank, (top_token_id, top_logprob) in enumerate(token.top):
                score = np.float32(base + np.float32(top_logprob))
                pool.append((score if not np.isnan(score) else np.float32(-np.inf), order, rank,
                             seq, top_token_id))
        pool.sort(key=lambda c: (-c[0], c[1], c[2]))
        return [Continuation(seq, tok, score) for score, _, _, seq, tok in pool[: 2 * self.width]]

    def _next_running(self, candidates: list[Continuation], ends: list[bool]) -> list[Continuation]:
        ranked = sorted(
            range(len(candidates)),
            key=lambda i: -(candidates[i].score + (_NEG if ends[i] else 0)),
        )
        chosen = []
        for i in ranked[: self.width]:
            c = candidates[i]
            chosen.append(Continuation(c.parent, c.token_id, c.score + (_NEG if ends[i] else 0)))
        return chosen

    def _update_finished(
        self, candidates: list[Continuation], ends: list[bool], gen_len: int
    ) -> None:
        if not self.improvable or (len(self.finished) == self.width and self.early_stopping):
            return
        for rank, (c, end) in enumerate(zip(candidates, ends, strict=True)):
            if rank >= self.width or not end:
                continue
            output = [*c.parent.output_token_ids, c.token_id]
            score = length_normalized(c.score, gen_len, self.length_penalty)
            self.finished.append(Hypothesis(score, output, c.token_id in self.stop_token_ids,
                                            float(c.score)))
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[self.width :]

    def _is_improvable(self, best_running: np.float32, gen_len: int) -> bool:
        if len(self.finished) < self.width:
            return True
        # HF's ``is_done`` divides a Python float (double), the finished scores are fp32.
        best_possible = length_normalized(best_running, gen_len, self.length_penalty,
                                          fp32=False)
        return best_possible > self.finished[-1].score


def length_normalized(cumulative: float | np.float32, gen_len: int, length_penalty: float,
                      fp32: bool = True) -> float:
    """``cumulative / gen_len ** length_penalty``, in fp32 or double as Hugging Face computes
    each; ``-inf`` (ranks last) when that is not a finite number, never an exception."""
    try:
        denominator = float(gen_len) ** length_penalty
    except OverflowError:
        return -math.inf
    with np.errstate(all="ignore"):
        if fp32:
            score = float(np.float32(cumulative) / np.float32(denominator))
        else:
            score = float(np.float64(cumulative) / np.float64(denominator))
    return score if math.isfinite(score) else -math.inf
