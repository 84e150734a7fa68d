"""Turns a ``StepPlan`` into the ``StepRequest`` delta for a worker, and records what the worker
now knows. A sequence's tokens and block ids travel once; after that only what was appended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from protos.pagedserve.v1 import common_pb2, worker_pb2
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


def build_step_request(
    step_id: int, plan: StepPlan, dropped_seq_ids: list[int],
    seq_by_id: Callable[[int], Sequence | None],
    published: Iterable[tuple[int, bytes]] = (),
) -> worker_pb2.StepRequest:
    request = worker_pb2.StepRequest(step_id=step_id, finished_seq_ids=dropped_seq_ids)
    add_cached = request.cached.add  # add(): a third of the cost of building then extending
    for block_id, block_hash in published:
        add_cached(block_id=block_id, block_hash=block_hash)
    # Pass 1: sequences the worker has not seen. Forks copy the parent as it stands before this
    # step's appends, so this pass must run before any parent's sync state moves.
    for item in plan.scheduled:
        if not item.seq.on_worker:
            request.new_seqs.append(_new_sequence(item, seq_by_id))
    _fill_scheduled(request.scheduled, plan.scheduled)
    if plan.copies:
        request.copies.extend(worker_pb2.BlockMapping(src=s, dst=d) for s, d in plan.copies)
    if plan.swap_out:
        request.swap_out.extend(worker_pb2.BlockMapping(src=s, dst=d) for s, d in plan.swap_out)
    if plan.swap_in:
        request.swap_in.extend(worker_pb2.BlockMapping(src=s, dst=d) for s, d in plan.swap_in)
    return request


def _new_sequence(
    item: ScheduledSeq, seq_by_id: Callable[[int], Sequence | None]
) -> worker_pb2.NewSequence:
    seq = item.seq
    msg = worker_pb2.NewSequence(
        seq_id=seq.seq_id,
        num_prompt_tokens=seq.num_prompt_tokens,
        params=worker_params(item.group, seq),
    )
    parent = seq_by_id(seq.parent_seq_id) if seq.parent_seq_id is not None else None
    if parent is not None and parent.on_worker:
        msg.parent_seq_id = parent.seq_id
        msg.token_ids.extend(seq.token_ids[parent.num_tokens_on_worker :])
    else:
        msg.token_ids.extend(seq.token_ids)
    seq.parent_seq_id = None
    seq.num_tokens_on_worker = seq.num_tokens
    seq.num_blocks_on_worker = 0
    seq.replace_table = True
    return msg


def _fill_scheduled(batch: worker_pb2.ScheduledBatch, items: list[ScheduledSeq]) -> None:
    """One row per item into the columns of ``batch`` (see worker.proto), and the worker-sync
    state moved past it. This is the per-sequence hot path of every step: columns that read
    state this function changes (``replace_table``) are taken first, the rest filled in one pass
    into plain lists; each column is one ``extend``."""
    seq_ids: list[int] = []
    computed: list[int] = []
    num_append: list[int] = []
    append_ids: list[int] = []
    num_blocks: list[int] = []
    block_ids: list[int] = []
    add_seq_id, add_computed = seq_ids.append, computed.append
    add_num_append, add_num_blocks = num_append.append, num_blocks.append
    batch.replace_block_table.extend([item.seq.replace_table for item in items])
    batch.num_new_tokens.extend([item.num_new_tokens for item in items])
    batch.sample.extend([item.sample for item in items])
    for item in items:
        seq = item.seq
        tokens = seq.token_ids
        num_tokens = len(tokens)
        add_seq_id(seq.seq_id)
        add_computed(seq.num_computed_tokens)
        unsent = num_tokens - seq.num_tokens_on_worker
        add_num_append(unsent)
        if unsent == 1:
            append_ids.append(tokens[-1])
        elif unsent:
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
    batch.seq_ids.extend(seq_ids)
    batch.num_computed_tokens.extend(computed)
    batch.num_append_tokens.extend(num_append)
    batch.append_token_ids.extend(append_ids)
    batch.num_new_blocks.extend(num_blocks)
    batch.new_block_ids.extend(block_ids)
