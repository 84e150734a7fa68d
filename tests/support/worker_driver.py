"""A minimal stand-in for the scheduler, for driving a ``Worker`` step by step in tests.

It allocates blocks from a shuffled free list (so block tables are non-contiguous), sends each
sequence's tokens once, optionally splits prefills into chunks, and counts on the worker to append
every sampled token itself — the same protocol the real scheduler follows.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pagedserve.core.step import (
    NewSeq,
    SampledRow,
    ScheduledBatch,
    ScheduledRow,
    WorkerResult,
    WorkerStep,
)
from protos.pagedserve.v1 import common_pb2

StepFn = Callable[[WorkerStep], WorkerResult]


@dataclass
class _Seq:
    seq_id: int
    tokens: list[int]
    num_prompt_tokens: int
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # sampled, not yet scheduled
    outputs: list[int] = field(default_factory=list)
    logprobs: list[SampledRow] = field(default_factory=list)
    registered: bool = False


class StepDriver:
    def __init__(self, step: StepFn, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.step_fn = step
        self.block_size = block_size
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.step_id = 0
        self.requests: list[WorkerStep] = []

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        params: common_pb2.SamplingParams | None = None,
        first_chunk: int | None = None,
        first_seq_id: int = 1,
    ) -> list[_Seq]:
        """Runs all prompts as one batch until each has ``max_new_tokens`` outputs. With
        ``first_chunk``, every prefill's first step computes only that many tokens."""
        params = params or common_pb2.SamplingParams(temperature=0.0)
        seqs = [_Seq(first_seq_id + i, list(p), len(p)) for i, p in enumerate(prompts)]
        while any(len(s.outputs) < max_new_tokens for s in seqs):
            active = [s for s in seqs if len(s.outputs) < max_new_tokens]
            self._run_step(active, params, first_chunk)
        self._finish(seqs)
        return seqs

    def _run_step(
        self, seqs: list[_Seq], params: common_pb2.SamplingParams, first_chunk: int | None
    ) -> None:
        req = WorkerStep(step_id=self.step_id)
        rows = []
        for s in seqs:
            if not s.registered:
                req.new_seqs.append(NewSeq(s.seq_id, list(s.tokens), s.num_prompt_tokens, params))
                s.registered = True
            rows.append(self._schedule(s, first_chunk))
        req.scheduled = ScheduledBatch.from_rows(rows)
        self.requests.append(req)
        resp = self.step_fn(req)
        self.step_id += 1
        by_id = {s.seq_id: s for s in seqs}
        for tok in resp.rows():
            seq = by_id[tok.seq_id]
            seq.pending.append(tok.token_id)
            seq.outputs.append(tok.token_id)
            seq.logprobs.append(tok)

    def _schedule(self, s: _Seq, first_chunk: int | None) -> ScheduledRow:
        appended, s.pending = s.pending, []
        s.tokens.extend(appended)
        num_new = len(s.tokens) - s.num_computed
        if first_chunk is not None and s.num_computed == 0:
            num_new = min(num_new, first_chunk)
        end = s.num_computed + num_new
        need = -(-end // self.block_size) - len(s.blocks)
        new_blocks = [self.free.pop() for _ in range(max(need, 0))]
        s.blocks.extend(new_blocks)
        sched = ScheduledRow(
            seq_id=s.seq_id, num_computed_tokens=s.num_computed, num_new_tokens=num_new,
            new_block_ids=new_blocks, sample=end == len(s.tokens),
        )
        s.num_computed = end
        return sched

    def _finish(self, seqs: list[_Seq]) -> None:
        req = WorkerStep(step_id=self.step_id, finished_seq_ids=[s.seq_id for s in seqs])
        self.requests.append(req)
        self.step_fn(req)
        self.step_id += 1
        for s in seqs:
            self.free.extend(s.blocks)
            s.blocks = []
