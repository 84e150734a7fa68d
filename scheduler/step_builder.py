"""Turns a ``StepPlan`` into the ``WorkerStep`` delta for a worker (``pagedserve.step``), and
records what the worker now knows. A sequence's tokens and block ids travel once; after that only
new block ids, and tokens only where the scheduler overrides the worker's samples (beam search).
"""

from __future__ import annotations

from collections.abc import Callable

from pagedserve.step import NewSeq, ScheduledBatch, WorkerStep
from protos.pagedserve.v1 import common_pb2
from scheduler.policy import ScheduledSeq, StepPlan
from scheduler.sequence import Sequence, SequenceGroup


def worker_params(group: SequenceGroup, seq: Sequence) -> common_pb2.SamplingParams:
    """What the worker samples with: per-sample seeds differ, beam search asks for top logprobs."""
    params = common_pb2.SamplingParams()
    params.CopyFrom(group.params)
    if params.HasField("seed"):
        params.seed = (params.seed + seq.index) % (1 << 64)
    if group.beam is not None:
        params.temperature = 0.0
        params.logprobs = 2 * params.beam_width
        params.ClearField("stop")
    return params


def build_step(
    step_id: int, plan: StepPlan, dropped_seq_ids: list[int],
    seq_by_id: Callable[[int], Sequence | None],
    published: list[tuple[int, bytes]] | None = None,
) -> WorkerStep:
    # Pass 1: sequences the worker has not seen. Forks copy the parent as it stands before this
    # step's appends, so this pass must run before any parent's sync state moves.
    new_seqs = [_new_sequence(item, seq_by_id) for item in plan.scheduled
                if not item.seq.on_worker]
    return WorkerStep(
        step_id=step_id, new_seqs=new_seqs, scheduled=_scheduled(plan.scheduled),
        finished_seq_ids=dropped_seq_ids, copies=plan.copies, swap_out=plan.swap_out,
        swap_in=plan.swap_in, cached=published if published is not None else [])


def _new_sequence(item: ScheduledSeq, seq_by_id: Callable[[int], Sequence | None]) -> NewSeq:
    seq = item.seq
    parent = seq_by_id(seq.parent_seq_id) if seq.parent_seq_id is not None else None
    new = NewSeq(seq.seq_id, seq.token_ids, seq.num_prompt_tokens,
                 worker_params(item.group, seq), scheduler_appends=item.group.beam is not None)
    if parent is not None and parent.on_worker:
        new.parent_seq_id = parent.seq_id
        new.token_ids = seq.token_ids[parent.num_tokens_on_worker :]
    else:
        new.token_ids = list(seq.token_ids)
    seq.parent_seq_id = None
    seq.num_tokens_on_worker = seq.num_tokens
    seq.num_blocks_on_worker = 0
    seq.replace_table = True
    return new


def _scheduled(items: list[ScheduledSeq]) -> ScheduledBatch:
    """One row per item into the columns of a ``ScheduledBatch``, and the worker-sync state
    moved past it. This is the per-sequence hot path of every step: columns that read state this
    function changes (``replace_table``) are taken first, the rest filled in one pass."""
    batch = ScheduledBatch(
        replace_block_table=[item.seq.replace_table for item in items],
        num_new_tokens=[item.num_new_tokens for item in items],
        sample=[item.sample for item in items],
    )
    add_seq_id, add_computed = batch.seq_ids.append, batch.num_computed_tokens.append
    add_num_append, add_num_blocks = batch.num_append_tokens.append, batch.num_new_blocks.append
    append_ids, block_ids = batch.append_token_ids, batch.new_block_ids
    for item in items:
        seq = item.seq
        tokens = seq.token_ids
        num_tokens = len(tokens)
        add_seq_id(seq.seq_id)
        add_computed(seq.num_computed_tokens)
        unsent = num_tokens - seq.num_tokens_on_worker
        add_num_append(unsent)
        if unsent:  # tokens the scheduler chose (beam search); the worker appends its samples
            append_ids.extend(tokens[seq.num_tokens_on_worker :])
        blocks = seq.blocks
        first = 0 if seq.replace_table else seq.num_blocks_on_worker
        if len(blocks) > first:
            add_num_blocks(len(blocks) - first)
            block_ids.extend([b.block_id for b in blocks[first:]])
        else:
            add_num_blocks(0)
        seq.on_worker = True
        seq.replace_table = False
        seq.num_tokens_on_worker = num_tokens
        seq.num_blocks_on_worker = len(blocks)
        seq.num_computed_tokens += item.num_new_tokens
    return batch
