"""A ``StepPlan`` becomes the ``WorkerStep`` delta for one worker (``build_step``, a pure function
of the plan and the worker's mirror), and ``commit`` is the one place where per-step state
advances: the scheduled sequences' computed tokens, the mirror's entries, and its drained outbox.

A sequence's tokens and block ids travel once; after that only new block ids, and tokens only
where the scheduler overrides the worker's samples (beam search). A table whose existing entries
changed (copy-on-write, swap) is sent whole::

    build_step(plan, mirror) -> WorkerStep      reads only
    commit(plan, mirror)                        num_computed_tokens += new; mirror := what the
                                                worker holds once the step ran (its own sample
                                                appended); outbox emptied
"""

from __future__ import annotations

from pagedserve.core.step import NewSeq, ScheduledBatch, WorkerStep
from protos.pagedserve.v1 import common_pb2
from scheduler.policy import ScheduledSeq, StepPlan
from scheduler.sequence import Sequence, SequenceGroup
from scheduler.worker_mirror import SeqOnWorker, WorkerMirror


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


def build_step(step_id: int, plan: StepPlan, mirror: WorkerMirror) -> WorkerStep:
    """The delta that brings the worker from what ``mirror`` says it holds to ``plan``."""
    known = mirror.seqs
    new_seqs = [_new_seq(item, known) for item in plan.scheduled
                if item.seq.seq_id not in known]
    return WorkerStep(
        step_id=step_id, new_seqs=new_seqs, scheduled=_scheduled(plan.scheduled, known),
        finished_seq_ids=list(mirror.dropped_seq_ids), copies=plan.copies,
        swap_out=plan.swap_out, swap_in=plan.swap_in, cached=list(mirror.cached))


def commit(plan: StepPlan, mirror: WorkerMirror) -> None:
    """The step built from ``plan`` is on its way: its sequences' tokens count as computed and
    ``mirror`` holds what the worker will know after it. A sampled sequence is counted with the
    token the worker appends itself (the engine appends the same token to its copy)."""
    known = mirror.seqs
    get = known.get
    for item in plan.scheduled:
        seq = item.seq
        seq.num_computed_tokens += item.num_new_tokens
        num_tokens = len(seq.token_ids)
        if item.sample and item.group.beam is None:
            num_tokens += 1
        entry = get(seq.seq_id)
        if entry is None:
            known[seq.seq_id] = SeqOnWorker(num_tokens, len(seq.blocks), seq.num_table_rewrites)
        else:
            entry.num_tokens = num_tokens
            entry.num_blocks = len(seq.blocks)
            entry.table_version = seq.num_table_rewrites
    mirror.dropped_seq_ids = []
    mirror.cached = []


def _new_seq(item: ScheduledSeq, known: dict[int, SeqOnWorker]) -> NewSeq:
    """All of a sequence's tokens, or, for a fork whose parent the worker holds as it was at the
    fork, the tokens after the parent's (the worker registers forks before this step's appends)."""
    seq = item.seq
    new = NewSeq(seq.seq_id, seq.token_ids, seq.num_prompt_tokens,
                 worker_params(item.group, seq), scheduler_appends=item.group.beam is not None)
    parent = known.get(seq.fork_of[0]) if seq.fork_of is not None else None
    if parent is not None and seq.fork_of is not None and parent.num_tokens == seq.fork_of[1]:
        new.parent_seq_id = seq.fork_of[0]
        new.token_ids = seq.token_ids[parent.num_tokens :]
    else:
        new.token_ids = list(seq.token_ids)
    return new


def _scheduled(items: list[ScheduledSeq], known: dict[int, SeqOnWorker]) -> ScheduledBatch:
    """One row per item into the columns of a ``ScheduledBatch``. This is the per-sequence hot
    path of every step: one dict lookup and a few attribute reads per sequence."""
    batch = ScheduledBatch(
        num_new_tokens=[item.num_new_tokens for item in items],
        sample=[item.sample for item in items],
    )
    add_seq_id, add_computed = batch.seq_ids.append, batch.num_computed_tokens.append
    add_replace = batch.replace_block_table.append
    add_num_append, add_num_blocks = batch.num_append_tokens.append, batch.num_new_blocks.append
    append_ids, block_ids = batch.append_token_ids, batch.new_block_ids
    get = known.get
    for item in items:
        seq = item.seq
        add_seq_id(seq.seq_id)
        add_computed(seq.num_computed_tokens)
        entry = get(seq.seq_id)
        blocks = seq.blocks
        if entry is None:  # registered by this step: all its tokens are in its NewSeq
            add_replace(True)
            add_num_append(0)
            first = 0
        else:
            replace = entry.table_version != seq.num_table_rewrites
            add_replace(replace)
            first = 0 if replace else entry.num_blocks
            tokens = seq.token_ids
            unsent = len(tokens) - entry.num_tokens
            add_num_append(unsent)
            if unsent:  # tokens the scheduler chose (beam search)
                append_ids.extend(tokens[entry.num_tokens :])
        if len(blocks) > first:
            add_num_blocks(len(blocks) - first)
            block_ids.extend([b.block_id for b in blocks[first:]])
        else:
            add_num_blocks(0)
    return batch
