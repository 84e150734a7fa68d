"""``ModelRunner``: turns one step's scheduled work into tensors, runs the model, samples.

Input building is vectorized over the flat batch (numpy), never a Python loop per token::

    seq:        A (computed 5, new 3)        B (computed 0, new 2)
    row:        0   1   2                    3   4
    positions:  5   6   7                    0   1
    slot:       table_A[p // bs] * bs + p % bs, ...

The runner owns the model, the attention backend and the sampler; it borrows the KV caches from
the ``CacheEngine`` and knows nothing about the scheduler or gRPC. At construction it chooses how
the model runs (``worker/models/execution.py``: the fused C++ layer stack, C++ ops, torch ops or
Triton attention), once, and prepares the model for that path; every step runs that path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from worker.attention.metadata import AttentionMetadata, HostMetadata
from worker.models.execution import Execution, ExecutionPath, prepare_execution
from worker.models.llama import KVCache, LlamaForCausalLM
from worker.sampler import Sampler, SamplerOutput, SamplingRow
from worker.sequence_state import SequenceState

logger = logging.getLogger(__name__)


@dataclass
class ScheduledWork:
    """Compute tokens ``[num_computed_tokens, num_computed_tokens + num_new_tokens)`` of ``seq``."""

    seq: SequenceState
    num_computed_tokens: int
    num_new_tokens: int
    sample: bool

    @property
    def end(self) -> int:
        return self.num_computed_tokens + self.num_new_tokens


@dataclass
class StepResult:
    seq_ids: list[int]  # sampled sequences, in scheduled order
    output: SamplerOutput
    forward_seconds: float
    sample_seconds: float


@dataclass
class BatchInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    last_rows: np.ndarray  # [batch] row of each sequence's last new token


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        sampler: Sampler,
        block_size: int,
        device: torch.device,
        path: ExecutionPath | None = None,
        tensor_parallel_size: int = 1,
    ) -> None:
        """``path`` forces a slower execution path than the one chosen (tests, debugging).
        ``model`` may be one rank's slice of a model split over ``tensor_parallel_size``
        ranks."""
        self.model = model
        self.sampler = sampler
        self.block_size = block_size
        self.device = device
        self.execution: Execution = prepare_execution(model, device, path, tensor_parallel_size)

    @torch.inference_mode()
    def execute(self, work: list[ScheduledWork], kv_caches: list[KVCache]) -> StepResult:
        """Runs the step's tokens and samples the rows that ask for it. A model without logits
        (a tensor-parallel follower) only runs the forward: its ``StepResult`` names the
        sampled sequences with no tokens (the leader's are shared with it)."""
        if not work:
            return StepResult([], SamplerOutput([], []), 0.0, 0.0)
        start = time.perf_counter()
        inputs = self.prepare(work)
        run = self.execution
        hidden = run.forward(inputs.input_ids, inputs.positions, kv_caches, inputs.meta)
        sampled = [i for i, w in enumerate(work) if w.sample]
        logits = run.compute_logits(hidden[torch.from_numpy(inputs.last_rows[sampled])
                                           .to(self.device)]) if sampled and \
            self.model.computes_logits else None
        self._sync()
        mid = time.perf_counter()
        output = SamplerOutput([], [])
        if logits is not None:
            output = self.sampler.sample(logits, [self._sampling_row(work[i]) for i in sampled])
        self._sync()
        return StepResult(
            [work[i].seq.seq_id for i in sampled], output, mid - start, time.perf_counter() - mid
        )

    def prepare(self, work: list[ScheduledWork]) -> BatchInputs:
        starts = np.array([w.num_computed_tokens for w in work], dtype=np.int64)
        lens = np.array([w.num_new_tokens for w in work], dtype=np.int64)
        seq_lens = starts + lens
        cu = np.zeros(len(work) + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        seq_idx = np.repeat(np.arange(len(work)), lens)
        positions = np.arange(cu[-1]) - cu[:-1][seq_idx] + starts[seq_idx]
        input_ids = np.concatenate([w.seq.token_ids[w.num_computed_tokens : w.end] for w in work])
        tables = self._block_tables(work, seq_lens)
        bs = self.block_size
        slots = tables[seq_idx, positions // bs].astype(np.int64) * bs + positions % bs
        meta = AttentionMetadata(
            slot_mapping=self._t(slots, torch.int64),
            query_start_loc=self._t(cu, torch.int32),
            seq_lens=self._t(seq_lens, torch.int32),
            block_tables=self._t(tables, torch.int32),
            max_query_len=int(lens.max()),
            max_seq_len=int(seq_lens.max()),
            block_size=bs,
            is_decode_only=bool((lens == 1).all()),
            host=HostMetadata(seq_lens, lens, tables),
        )
        return BatchInputs(
            self._t(input_ids, torch.int64), self._t(positions, torch.int64), meta, cu[1:] - 1
        )

    def _block_tables(self, work: list[ScheduledWork], seq_lens: np.ndarray) -> np.ndarray:
        """``[batch, max_blocks]`` int32; only the blocks that cover each sequence's length.
        Padding entries are 0 and never read (see ``AttentionMetadata``)."""
        num_blocks = (seq_lens + self.block_size - 1) // self.block_size
        tables = np.zeros((len(work), max(int(num_blocks.max()), 1)), dtype=np.int32)
        for i, w in enumerate(work):
            tables[i, : num_blocks[i]] = w.seq.block_table[: num_blocks[i]]
        return tables

    def _t(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype)

    @staticmethod
    def _sampling_row(w: ScheduledWork) -> SamplingRow:
        return SamplingRow(w.seq.params, w.seq.prompt_ids, w.seq.output_ids(w.end))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def profile_peak_memory(
        self, num_tokens: int, num_seqs: int, kv_caches: list[KVCache]
    ) -> int:
        """Peak CUDA bytes of a dummy step: one ``num_tokens`` prefill, then logits and sampling
        for ``num_seqs`` rows. ``kv_caches`` must hold ``ceil(num_tokens / block_size)`` blocks."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        vocab = self.model.config.vocab_size
        ids = torch.randint(0, vocab, (num_tokens,), device=self.device)
        positions = torch.arange(num_tokens, device=self.device)
        num_blocks = (num_tokens + self.block_size - 1) // self.block_size
        meta = AttentionMetadata(
            slot_mapping=positions.clone(),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=self.device)[None],
            max_query_len=num_tokens, max_seq_len=num_tokens, block_size=self.block_size,
        )
        hidden = self.execution.forward(ids, positions, kv_caches, meta)
        rows = hidden[:1].expand(num_seqs, -1)
        logits = self.execution.compute_logits(rows)
        torch.softmax(logits, dim=-1).sort(dim=-1)  # the sampler's biggest temporaries
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del hidden, logits
        torch.cuda.empty_cache()
        return int(peak)
