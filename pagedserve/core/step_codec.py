"""The one codec between the step contract (``pagedserve.core.step``) and its wire form
(``StepRequest``/``StepResponse`` in worker.proto): one encoder and one decoder per message.

Only the gRPC edge uses it: ``scheduler.worker_handle.GrpcWorkerHandle`` encodes steps and decodes
results, ``worker.servicer.WorkerServicer`` the reverse. Both wire forms are columnar, so each
column is one ``extend``. Decoding checks that the columns agree in length, so a malformed
message is refused (``InvalidArgument``) before anything reads past a column's end.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from pagedserve.core.errors import InvalidArgument
from pagedserve.core.step import NewSeq, ScheduledBatch, TopPairs, WorkerResult, WorkerStep
from protos.pagedserve.v1 import worker_pb2


def encode_step(step: WorkerStep) -> worker_pb2.StepRequest:
    request = worker_pb2.StepRequest(step_id=step.step_id, finished_seq_ids=step.finished_seq_ids)
    for new in step.new_seqs:
        request.new_seqs.append(worker_pb2.NewSequence(
            seq_id=new.seq_id, token_ids=new.token_ids, num_prompt_tokens=new.num_prompt_tokens,
            params=new.params, parent_seq_id=new.parent_seq_id,
            scheduler_appends=new.scheduler_appends))
    _encode_scheduled(request.scheduled, step.scheduled)
    for pairs, column in ((step.copies, request.copies), (step.swap_out, request.swap_out),
                          (step.swap_in, request.swap_in)):
        column.extend(worker_pb2.BlockMapping(src=s, dst=d) for s, d in pairs)
    add_cached = request.cached.add  # add(): a third of the cost of building then extending
    for block_id, block_hash in step.cached:
        add_cached(block_id=block_id, block_hash=block_hash)
    return request


def decode_step(request: worker_pb2.StepRequest) -> WorkerStep:
    """The step ``request`` carries; ``InvalidArgument`` if its columns disagree."""
    return WorkerStep(
        step_id=request.step_id,
        new_seqs=[NewSeq(n.seq_id, list(n.token_ids), n.num_prompt_tokens,
                         n.params if n.HasField("params") else None,
                         n.parent_seq_id if n.HasField("parent_seq_id") else None,
                         n.scheduler_appends)
                  for n in request.new_seqs],
        scheduled=_decode_scheduled(request.scheduled),
        finished_seq_ids=list(request.finished_seq_ids),
        copies=[(m.src, m.dst) for m in request.copies],
        swap_out=[(m.src, m.dst) for m in request.swap_out],
        swap_in=[(m.src, m.dst) for m in request.swap_in],
        cached=[(c.block_id, c.block_hash) for c in request.cached],
    )


def encode_result(result: WorkerResult) -> worker_pb2.StepResponse:
    response = worker_pb2.StepResponse(step_id=result.step_id,
                                       forward_seconds=result.forward_seconds,
                                       sample_seconds=result.sample_seconds)
    sampled = response.sampled
    sampled.seq_ids.extend(result.seq_ids)
    sampled.token_ids.extend(result.token_ids)
    sampled.logprobs.extend(result.logprobs)
    if result.top_logprobs:
        tops = result.top_logprobs
        sampled.num_top.extend([len(top) for top in tops])
        sampled.top_token_ids.extend([t for top in tops for t, _ in top])
        sampled.top_logprobs.extend([lp for top in tops for _, lp in top])
    return response


def decode_result(response: worker_pb2.StepResponse) -> WorkerResult:
    """The result ``response`` carries; ``InvalidArgument`` if its columns disagree."""
    sampled = response.sampled
    seq_ids = list(sampled.seq_ids)
    n = len(seq_ids)
    _check_len(sampled.token_ids, n, "sampled.token_ids")
    _check_len(sampled.logprobs, n, "sampled.logprobs")
    tops: list[TopPairs] = []
    if len(sampled.num_top):
        _check_len(sampled.num_top, n, "sampled.num_top")
        _check_len(sampled.top_logprobs, len(sampled.top_token_ids), "sampled.top_logprobs")
        pairs = list(zip(sampled.top_token_ids, sampled.top_logprobs, strict=True))
        tops = _split(pairs, sampled.num_top, "sampled.top_token_ids")
    return WorkerResult(response.step_id, seq_ids, list(sampled.token_ids),
                        list(sampled.logprobs), tops, response.forward_seconds,
                        response.sample_seconds)


def _encode_scheduled(batch: worker_pb2.ScheduledBatch, scheduled: ScheduledBatch) -> None:
    batch.seq_ids.extend(scheduled.seq_ids)
    batch.num_computed_tokens.extend(scheduled.num_computed_tokens)
    batch.num_new_tokens.extend(scheduled.num_new_tokens)
    batch.sample.extend(scheduled.sample)
    batch.replace_block_table.extend(scheduled.replace_block_table)
    batch.num_append_tokens.extend(scheduled.num_append_tokens)
    batch.append_token_ids.extend(scheduled.append_token_ids)
    batch.num_new_blocks.extend(scheduled.num_new_blocks)
    batch.new_block_ids.extend(scheduled.new_block_ids)


def _decode_scheduled(batch: worker_pb2.ScheduledBatch) -> ScheduledBatch:
    n = len(batch.seq_ids)
    for column, name in ((batch.num_computed_tokens, "num_computed_tokens"),
                         (batch.num_new_tokens, "num_new_tokens"), (batch.sample, "sample"),
                         (batch.replace_block_table, "replace_block_table"),
                         (batch.num_append_tokens, "num_append_tokens"),
                         (batch.num_new_blocks, "num_new_blocks")):
        _check_len(column, n, f"scheduled.{name}")
    _check_total(batch.append_token_ids, batch.num_append_tokens, "scheduled.append_token_ids")
    _check_total(batch.new_block_ids, batch.num_new_blocks, "scheduled.new_block_ids")
    return ScheduledBatch(
        list(batch.seq_ids), list(batch.num_computed_tokens), list(batch.num_new_tokens),
        list(batch.sample), list(batch.replace_block_table), list(batch.num_append_tokens),
        list(batch.append_token_ids), list(batch.num_new_blocks), list(batch.new_block_ids))


def _check_len(column: Sequence[object], n: int, name: str) -> None:
    if len(column) != n:
        raise InvalidArgument(name, f"has {len(column)} entries for {n} sequences")


def _check_total(flat: Sequence[object], counts: Sequence[int], name: str) -> None:
    if sum(counts) != len(flat):
        raise InvalidArgument(name, f"has {len(flat)} entries but the counts add up to "
                                    f"{sum(counts)}")


def _split(flat: Sequence[object], counts: Sequence[int], name: str) -> list[list]:
    """``flat`` cut into consecutive runs of ``counts[i]`` items."""
    _check_total(flat, counts, name)
    ends = list(itertools.accumulate(counts))
    flat = list(flat)
    return [flat[end - count:end] for end, count in zip(ends, counts, strict=True)]
