"""Turns a ``StepPlan`` into the ``StepRequest`` delta for a worker, and records what the worker
now knows. A sequence's tokens and block ids travel once; after that only what was appended.
"""

from __future__ import annotations

from collections.abc import Callable

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
    published: list[tuple[int, bytes]] = (),  # type: ignore[assignment]
) -> worker_pb2.StepRequest:
    request = worker_pb2.StepRequest(step_id=step_id, finished_seq_ids=dropped_seq_ids)
    request.cached.extend(worker_pb2.BlockHash(block_id=b, block_hash=h) for b, h in published)
    # Pass 1: sequences the worker has not seen. Forks copy the parent as it stands before this
    # step's appends, so this pass must run before any parent's sync state moves.
    for item in plan.scheduled:
        if not item.seq.on_worker:
            request.new_seqs.append(_new_sequence(item, seq_by_id))
    for item in plan.scheduled:
        request.scheduled.append(_scheduled_sequence(item))
    request.copies.extend(worker_pb2.BlockMapping(src=s, dst=d) for s, d in plan.copies)
    request.swap_out.extend(worker_pb2.BlockMapping(src=s, dst=d) for s, d in plan.swap_out)
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


def _scheduled_sequence(item: ScheduledSeq) -> worker_pb2.ScheduledSequence:
    seq = item.seq
    msg = worker_pb2.ScheduledSequence(
        seq_id=seq.seq_id,
        num_computed_tokens=seq.num_computed_tokens,
        num_new_tokens=item.num_new_tokens,
        sample=item.sample,
        replace_block_table=seq.replace_table,
    )
    if seq.num_tokens_on_worker < seq.num_tokens:
        msg.append_token_ids.extend(seq.token_ids[seq.num_tokens_on_worker :])
    first = 0 if seq.replace_table else seq.num_blocks_on_worker
    msg.new_block_ids.extend(b.block_id for b in seq.blocks[first:])
    seq.on_worker = True
    seq.replace_table = False
    seq.num_tokens_on_worker = seq.num_tokens
    seq.num_blocks_on_worker = len(seq.blocks)
    seq.num_computed_tokens += item.num_new_tokens
    return msg
