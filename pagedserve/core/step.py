"""The step contract between the scheduler and a worker, as plain typed objects.

The scheduler tells a worker what to do in a ``WorkerStep`` and gets a ``WorkerResult`` back.
Both sides (the scheduler's step builder and engine, ``worker.worker.Worker``, the in-process
handle, test doubles) use these objects; protobuf appears only where a step crosses the network
(``pagedserve.core.step_codec``, used by the gRPC worker handle and the worker servicer). A step
applies in a fixed order::

    1. drop finished_seq_ids          4. swap_out, then swap_in, then copies
    2. register new_seqs (forks copy  5. per scheduled seq: append append_token_ids, then replace
       the parent's tokens as they       or extend its block table, then compute its tokens
       stand before this step)        6. sample the seqs with sample=true; append each sampled
    3. record cached block hashes        token to its sequence unless the scheduler appends

A sequence's tokens travel once (``NewSeq``); after that the worker appends its own samples, so
``append_token_ids`` carries only tokens the scheduler decides instead of the worker: a beam
search's chosen continuations (its sequences are registered with ``scheduler_appends``).

Per-sequence fields of a step are columns (``ScheduledBatch``, ``WorkerResult``), so the
scheduler's hot path fills a step with a few list ``extend`` calls; code that thinks one sequence
at a time converts with ``ScheduledBatch.rows``/``from_rows`` and ``WorkerResult.rows``/
``from_rows``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from protos.pagedserve.v1 import common_pb2

BlockPair = tuple[int, int]  # (src block id, dst block id)
TopPairs = list[tuple[int, float]]  # (token id, log-prob), best first


@dataclass(slots=True)
class NewSeq:
    """A sequence the worker has not seen: all its tokens, once. A fork (``parent_seq_id`` set)
    copies the parent's tokens as they stand before this step's appends, then appends
    ``token_ids``. ``params`` are the request's resolved sampling params as the worker samples
    with them (``scheduler.step_builder.worker_params``); ``None``: a fork's parent's, else the
    defaults. With ``scheduler_appends`` the worker does not append its samples to the sequence
    (beam search picks the tokens itself)."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: common_pb2.SamplingParams | None = None
    parent_seq_id: int | None = None
    scheduler_appends: bool = False


@dataclass(slots=True)
class ScheduledRow:
    """One sequence's work this step: compute tokens [num_computed_tokens, +num_new_tokens)."""

    seq_id: int
    num_computed_tokens: int = 0
    num_new_tokens: int = 0
    sample: bool = True
    replace_block_table: bool = False
    append_token_ids: list[int] = field(default_factory=list)
    new_block_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class ScheduledBatch:
    """The sequences computed this step, as columns: entry i of every per-sequence column
    describes the i-th scheduled sequence. Variable-length fields are flattened:
    ``num_append_tokens[i]`` entries of ``append_token_ids`` (tokens to append before computing)
    and ``num_new_blocks[i]`` of ``new_block_ids`` (appended to, or with
    ``replace_block_table[i]`` replacing, the block table)."""

    seq_ids: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    replace_block_table: list[bool] = field(default_factory=list)
    num_append_tokens: list[int] = field(default_factory=list)
    append_token_ids: list[int] = field(default_factory=list)
    num_new_blocks: list[int] = field(default_factory=list)
    new_block_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seq_ids)

    def rows(self) -> list[ScheduledRow]:
        """One row per sequence; the columns must agree (``step_codec`` checks decoded ones)."""
        appends = split(self.append_token_ids, self.num_append_tokens)
        blocks = split(self.new_block_ids, self.num_new_blocks)
        return [ScheduledRow(*cols) for cols in zip(
            self.seq_ids, self.num_computed_tokens, self.num_new_tokens, self.sample,
            self.replace_block_table, appends, blocks, strict=True)]

    @classmethod
    def from_rows(cls, rows: Iterable[ScheduledRow]) -> ScheduledBatch:
        rows = list(rows)
        return cls(
            seq_ids=[r.seq_id for r in rows],
            num_computed_tokens=[r.num_computed_tokens for r in rows],
            num_new_tokens=[r.num_new_tokens for r in rows],
            sample=[r.sample for r in rows],
            replace_block_table=[r.replace_block_table for r in rows],
            num_append_tokens=[len(r.append_token_ids) for r in rows],
            append_token_ids=[t for r in rows for t in r.append_token_ids],
            num_new_blocks=[len(r.new_block_ids) for r in rows],
            new_block_ids=[b for r in rows for b in r.new_block_ids],
        )


@dataclass(slots=True)
class WorkerStep:
    """What a worker is told for one step: only what changed since the previous one."""

    step_id: int = 0
    new_seqs: list[NewSeq] = field(default_factory=list)
    scheduled: ScheduledBatch = field(default_factory=ScheduledBatch)
    finished_seq_ids: list[int] = field(default_factory=list)
    copies: list[BlockPair] = field(default_factory=list)    # GPU -> GPU copy-on-write
    swap_out: list[BlockPair] = field(default_factory=list)  # GPU -> CPU
    swap_in: list[BlockPair] = field(default_factory=list)   # CPU -> GPU
    # Full blocks published to the prefix cache since the last step: (block id, content hash).
    cached: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class SampledRow:
    """One sampled token; ``top`` holds (token id, log-prob) pairs, best first, when asked for."""

    seq_id: int
    token_id: int
    logprob: float
    top: TopPairs = field(default_factory=list)


@dataclass(slots=True)
class WorkerResult:
    """The tokens sampled in one step, as columns: entry i is the i-th sampled sequence, in
    scheduled order. ``top_logprobs`` is empty when no sequence asked for top log-probs, else one
    list of pairs per sampled sequence."""

    step_id: int = 0
    seq_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopPairs] = field(default_factory=list)
    forward_seconds: float = 0.0
    sample_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.seq_ids)

    def rows(self) -> list[SampledRow]:
        tops: Iterable[TopPairs] = self.top_logprobs or itertools.repeat([])
        return [SampledRow(s, t, lp, list(top)) for s, t, lp, top in zip(
            self.seq_ids, self.token_ids, self.logprobs, tops, strict=False)]

    @classmethod
    def from_rows(cls, rows: Iterable[SampledRow], step_id: int = 0) -> WorkerResult:
        rows = list(rows)
        tops = [r.top for r in rows] if any(r.top for r in rows) else []
        return cls(step_id, [r.seq_id for r in rows], [r.token_id for r in rows],
                   [r.logprob for r in rows], tops)


def split(flat: list, counts: list[int]) -> list[list]:
    """``flat`` cut into consecutive runs of ``counts[i]`` items."""
    ends = itertools.accumulate(counts)
    return [flat[end - count:end] for end, count in zip(ends, counts, strict=True)]
