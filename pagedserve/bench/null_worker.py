"""A worker that computes nothing: it answers each step at once with seeded pseudo-random tokens
and top log-probs. For measuring what the scheduler alone does (block accounting, sharing, CPU per
step) — never for outputs or speed of the model."""

from __future__ import annotations

import random
from collections.abc import Callable

from pagedserve.core.step import SampledRow, WorkerResult, WorkerStep
from protos.pagedserve.v1 import worker_pb2


class NullWorker:
    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int = 0, block_size: int = 16,
                 vocab_size: int = 32000, max_model_len: int = 8192, seed: int = 0) -> None:
        self.num_gpu_blocks, self.num_cpu_blocks = num_gpu_blocks, num_cpu_blocks
        self.block_size, self.vocab_size, self.max_model_len = block_size, vocab_size, max_model_len
        self.rng = random.Random(seed)
        self.logprobs: dict[int, int] = {}
        # Called with each request before it is answered, e.g. to sample memory use.
        self.on_step: Callable[[WorkerStep], None] | None = None

    def info(self) -> worker_pb2.WorkerInfo:
        return worker_pb2.WorkerInfo(
            worker_id="null", model="null", num_gpu_blocks=self.num_gpu_blocks,
            num_cpu_blocks=self.num_cpu_blocks, block_size=self.block_size,
            max_model_len=self.max_model_len, vocab_size=self.vocab_size, eos_token_ids=[0],
            device="none", attention_backend="none", instance_id="null")

    def reset(self) -> None:
        self.logprobs.clear()

    def step(self, step: WorkerStep) -> WorkerResult:
        if self.on_step is not None:
            self.on_step(step)
        for seq in step.new_seqs:
            self.logprobs[seq.seq_id] = seq.params.logprobs if seq.params is not None else 0
        for seq_id in step.finished_seq_ids:
            self.logprobs.pop(seq_id, None)
        batch = step.scheduled
        rows = zip(batch.seq_ids, batch.sample, strict=True)
        return WorkerResult.from_rows(
            [self._sample(seq_id) for seq_id, sample in rows if sample], step.step_id)

    def _sample(self, seq_id: int) -> SampledRow:
        k = self.logprobs.get(seq_id, 0)
        top = sorted((-self.rng.expovariate(1.0) for _ in range(max(k, 1))), reverse=True)
        tokens = self.rng.sample(range(1, self.vocab_size), len(top))
        pairs = list(zip(tokens, top, strict=True)) if k else []
        return SampledRow(seq_id, tokens[0], top[0], pairs)
