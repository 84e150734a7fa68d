"""Checks a ``WorkerStep`` against the worker's state *before* anything is mutated.

A step that fails here changes nothing (no sequence, block table or KV block), so the scheduler
can treat the error as "this step did not happen". The checks simulate the step's bookkeeping
(token counts and block-table lengths after appends) without touching tensors.

Only a step's *structure* is checked: that every id it carries indexes something this worker
owns (sequence ids, block ids in the pool, token ids in the embedding table and the logits: one
out of range would be an out-of-bounds access in a kernel) and that its token spans are
consistent. What a request may ask for is the router's business, what fits where the
scheduler's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from pagedserve.core.errors import InvalidArgument, NotFound, SequenceRefused
from pagedserve.core.step import NewSeq, ScheduledRow, WorkerStep
from pagedserve.core.token_ids import check_token_ids
from worker.cache_engine import CacheEngine
from worker.sequence_state import SequenceState


def validate_step(
    step: WorkerStep,
    scheduled: Sequence[ScheduledRow],
    seqs: Mapping[int, SequenceState],
    cache: CacheEngine,
    vocab_size: int,
) -> None:
    """Raises ``InvalidArgument`` / ``NotFound`` naming the offending field. ``scheduled`` is
    ``step.scheduled.rows()``."""
    finished = set(step.finished_seq_ids)
    lengths = {sid: s.num_tokens for sid, s in seqs.items() if sid not in finished}
    tables = {sid: len(s.block_table) for sid, s in seqs.items() if sid not in finished}
    _check_new_seqs(step.new_seqs, lengths, tables, vocab_size)
    cache.check_pairs(step.swap_out, "swap_out", "gpu", "cpu")
    cache.check_pairs(step.swap_in, "swap_in", "cpu", "gpu")
    cache.check_pairs(step.copies, "copies", "gpu", "gpu")
    _check_scheduled(scheduled, lengths, tables, cache, vocab_size)


def _check_new_seqs(
    new_seqs: Iterable[NewSeq],
    lengths: dict[int, int],
    tables: dict[int, int],
    vocab_size: int,
) -> None:
    for n in new_seqs:
        if n.seq_id in lengths:
            raise InvalidArgument("new_seqs.seq_id", f"sequence {n.seq_id} already exists")
        _check_request_ids(n, vocab_size)
        base = 0
        if n.parent_seq_id is not None:
            if n.parent_seq_id not in lengths:
                raise NotFound(f"new_seqs.parent_seq_id: no sequence {n.parent_seq_id}")
            base = lengths[n.parent_seq_id]
        lengths[n.seq_id] = base + len(n.token_ids)
        tables[n.seq_id] = 0
        if n.num_prompt_tokens > lengths[n.seq_id]:
            raise InvalidArgument("new_seqs.num_prompt_tokens", "exceeds the sequence's tokens")


def _check_request_ids(n: NewSeq, vocab_size: int) -> None:
    """The ids a request brought (its tokens; its stop ids, by which ``min_tokens`` indexes the
    logits): ``SequenceRefused`` names the sequence, so only its request fails."""
    try:
        check_token_ids(n.token_ids, vocab_size, "new_seqs.token_ids")
        if n.params is not None:
            check_token_ids(n.params.stop_token_ids, vocab_size, "new_seqs.params.stop_token_ids")
    except InvalidArgument as exc:
        raise SequenceRefused(exc.field, exc.reason, n.seq_id) from exc


def _check_scheduled(
    scheduled: Iterable[ScheduledRow],
    lengths: dict[int, int],
    tables: dict[int, int],
    cache: CacheEngine,
    vocab_size: int,
) -> None:
    seen: set[int] = set()
    for s in scheduled:
        if s.seq_id not in lengths:
            raise NotFound(f"scheduled.seq_id: no sequence {s.seq_id}")
        if s.seq_id in seen:
            raise InvalidArgument("scheduled.seq_id", f"sequence {s.seq_id} scheduled twice")
        seen.add(s.seq_id)
        check_token_ids(s.append_token_ids, vocab_size, "scheduled.append_token_ids")
        bad = [b for b in s.new_block_ids if b >= cache.num_gpu_blocks]
        if bad:
            raise InvalidArgument("scheduled.new_block_ids",
                                  f"block {bad[0]} >= num_gpu_blocks {cache.num_gpu_blocks}")
        num_tokens = lengths[s.seq_id] + len(s.append_token_ids)
        num_blocks = (0 if s.replace_block_table else tables[s.seq_id]) + len(s.new_block_ids)
        lengths[s.seq_id], tables[s.seq_id] = num_tokens, num_blocks
        _check_span(s, num_tokens, num_blocks * cache.block_size)


def _check_span(s: ScheduledRow, num_tokens: int, capacity: int) -> None:
    end = s.num_computed_tokens + s.num_new_tokens
    if s.num_new_tokens == 0:
        raise InvalidArgument("scheduled.num_new_tokens", f"seq {s.seq_id}: must be >= 1")
    if end > num_tokens:
        raise InvalidArgument(
            "scheduled.num_new_tokens",
            f"seq {s.seq_id}: computing up to {end} but it has only {num_tokens} tokens",
        )
    if end > capacity:
        raise InvalidArgument(
            "scheduled.new_block_ids",
            f"seq {s.seq_id}: {end} tokens need more than its {capacity}-token block table",
        )
    if s.sample and end != num_tokens:
        raise InvalidArgument(
            "scheduled.sample", f"seq {s.seq_id}: sampling needs every token computed ({end} "
            f"of {num_tokens})",
        )
