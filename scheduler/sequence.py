"""Sequences and sequence groups: a few counters plus a block table; the rest is derived.

A *sequence group* is one request: its prompt and the ``n`` (or ``best_of``, or ``beam_width``)
sequences generated from it, which share the prompt's blocks. Token positions of a sequence::

    [ prompt (num_prompt_tokens) | output ... ]
    [ computed (num_computed_tokens) | not yet computed ]     # computed = K/V in the cache
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from protos.pagedserve.v1 import common_pb2
from scheduler.block_pool import Block


class SequenceStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    SWAPPED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= SequenceStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> common_pb2.FinishReason:
        return {
            SequenceStatus.FINISHED_STOPPED: common_pb2.FINISH_REASON_STOP,
            SequenceStatus.FINISHED_LENGTH: common_pb2.FINISH_REASON_LENGTH,
            SequenceStatus.FINISHED_ABORTED: common_pb2.FINISH_REASON_ABORT,
        }.get(self, common_pb2.FINISH_REASON_UNSPECIFIED)


@dataclass(eq=False)
class Sequence:
    """One token stream. ``blocks`` is its block table (physical blocks, in logical order).

    What a worker already knows of it is not here but in that worker's mirror
    (``scheduler.step_builder.WorkerMirror``). ``num_table_rewrites`` counts changes to entries
    already in the table (copy-on-write, swap), which a worker must hear as a whole new table;
    appending blocks does not count.
    """

    seq_id: int
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    blocks: list[Block] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    cumulative_logprob: float = 0.0
    num_table_rewrites: int = 0
    # (parent seq id, the parent's token count) when forked; None after a recompute.
    fork_of: tuple[int, int] | None = None
    num_streamed_tokens: int = 0  # output tokens already sent to the client
    # Prefix-hash chain of this sequence's full blocks (grows as blocks fill).
    block_hashes: list[bytes] = field(default_factory=list)
    # Parent hash of its first block: its request's cache salt (``block_hash.chain_root``), None
    # for the shared partition. Kept by forks, recomputes and continuations.
    hash_root: bytes | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def reset_for_recompute(self) -> None:
        """After recompute preemption: the KV is gone, the tokens stay."""
        self.blocks = []
        self.num_computed_tokens = 0
        self.fork_of = None
        self.status = SequenceStatus.WAITING


@dataclass(eq=False)
class SequenceGroup:
    """One request. ``seqs`` starts with a single sequence that computes the prompt; parallel
    samples are forked from it when only the last prompt token is left (they share the prompt's
    blocks), beam candidates fork as beams branch."""

    request_id: str
    seqs: list[Sequence]
    params: common_pb2.SamplingParams
    arrival_order: int
    arrival_time: float = field(default_factory=time.monotonic)
    worker_id: str = ""
    num_samples: int = 1  # sequences to run: best_of (>= n); 1 for beam search's start
    forked: bool = False
    # scheduler.beam_search.BeamState when beam search: the scheduler appends its tokens.
    beam: object | None = None
    # The most KV blocks it can hold (scheduler.placement.blocks_needed): it is placed only on a
    # worker whose pool is at least this large. Set by the engine.
    num_blocks_needed: int = 0
    # Workers that failed while it ran on them (the engine stops moving it at a limit).
    num_worker_failures: int = 0
    # Tokens stream as they are sampled (not beam search, not best_of > n, whose outputs are
    # handed over whole by their output strategy): resolved once, the stream reads it per step.
    streams_tokens: bool = field(init=False)

    def __post_init__(self) -> None:
        holds_outputs = self.params.best_of > max(self.params.n, 1)
        self.streams_tokens = self.beam is None and not holds_outputs

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs) and (self.forked or self.num_samples == 1)

    @property
    def num_prompt_tokens(self) -> int:
        return self.seqs[0].num_prompt_tokens
