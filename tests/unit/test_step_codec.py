"""The step codec: every ``WorkerStep``/``WorkerResult`` survives its wire form unchanged, and a
message whose columns disagree is refused before anything reads it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedserve.core.errors import InvalidArgument
from pagedserve.core.step import NewSeq, ScheduledBatch, ScheduledRow, WorkerResult, WorkerStep
from pagedserve.core.step_codec import decode_result, decode_step, encode_result, encode_step
from protos.pagedserve.v1 import common_pb2, worker_pb2

seq_ids = st.integers(0, 2**64 - 1)
token_ids = st.integers(0, 2**31 - 1)
block_ids = st.integers(0, 2**32 - 1)
counts = st.integers(0, 2**32 - 1)
logprobs = st.floats(width=32, allow_nan=False)  # the wire's float is 32-bit
pairs = st.lists(st.tuples(block_ids, block_ids), max_size=4)

params = st.none() | st.builds(
    common_pb2.SamplingParams, temperature=st.floats(0, 2, width=32), top_k=st.integers(-1, 50),
    max_tokens=st.integers(1, 100), logprobs=st.integers(0, 5),
    stop_token_ids=st.lists(token_ids, max_size=3), seed=st.none() | st.integers(0, 2**64 - 1))

new_seqs = st.builds(NewSeq, seq_id=seq_ids, token_ids=st.lists(token_ids, max_size=8),
                     num_prompt_tokens=counts, params=params,
                     parent_seq_id=st.none() | seq_ids, scheduler_appends=st.booleans())

scheduled_rows = st.builds(
    ScheduledRow, seq_id=seq_ids, num_computed_tokens=counts, num_new_tokens=counts,
    sample=st.booleans(), replace_block_table=st.booleans(),
    append_token_ids=st.lists(token_ids, max_size=4), new_block_ids=st.lists(block_ids, max_size=4))

steps = st.builds(
    WorkerStep, step_id=seq_ids, new_seqs=st.lists(new_seqs, max_size=3),
    scheduled=st.lists(scheduled_rows, max_size=6).map(ScheduledBatch.from_rows),
    finished_seq_ids=st.lists(seq_ids, max_size=4), copies=pairs, swap_out=pairs, swap_in=pairs,
    cached=st.lists(st.tuples(block_ids, st.binary(max_size=16)), max_size=4))


@st.composite
def results(draw: st.DrawFn) -> WorkerResult:
    n = draw(st.integers(0, 6))
    with_tops = draw(st.booleans())
    tops = [draw(st.lists(st.tuples(token_ids, logprobs), max_size=4)) for _ in range(n)]
    return WorkerResult(
        step_id=draw(seq_ids), seq_ids=draw(st.lists(seq_ids, min_size=n, max_size=n)),
        token_ids=draw(st.lists(token_ids, min_size=n, max_size=n)),
        logprobs=draw(st.lists(logprobs, min_size=n, max_size=n)),
        top_logprobs=tops if with_tops and any(tops) else [],
        forward_seconds=draw(st.floats(0, 10)), sample_seconds=draw(st.floats(0, 10)))


@given(steps)
def test_a_step_survives_its_wire_form(step: WorkerStep) -> None:
    wire = encode_step(step)
    again = worker_pb2.StepRequest.FromString(wire.SerializeToString())
    assert decode_step(again) == step


@given(results())
def test_a_result_survives_its_wire_form(result: WorkerResult) -> None:
    wire = encode_result(result)
    again = worker_pb2.StepResponse.FromString(wire.SerializeToString())
    assert decode_result(again) == result


@given(st.lists(scheduled_rows, max_size=6))
def test_rows_and_columns_are_one_batch(rows: list[ScheduledRow]) -> None:
    assert ScheduledBatch.from_rows(rows).rows() == rows


def _ragged_steps() -> list[worker_pb2.StepRequest]:
    good = encode_step(WorkerStep(scheduled=ScheduledBatch.from_rows(
        [ScheduledRow(1, 0, 2, append_token_ids=[5], new_block_ids=[3])])))
    short_column = worker_pb2.StepRequest()
    short_column.CopyFrom(good)
    short_column.scheduled.sample.append(True)
    counts_off = worker_pb2.StepRequest()
    counts_off.CopyFrom(good)
    counts_off.scheduled.new_block_ids.append(4)
    return [short_column, counts_off]


@pytest.mark.parametrize("wire", _ragged_steps())
def test_a_step_whose_columns_disagree_is_refused(wire: worker_pb2.StepRequest) -> None:
    with pytest.raises(InvalidArgument, match="scheduled"):
        decode_step(wire)


def test_a_result_whose_columns_disagree_is_refused() -> None:
    wire = encode_result(WorkerResult(1, [1, 2], [5, 6], [-0.5, -1.0], [[(5, -0.5)], [(6, -1)]]))
    wire.sampled.logprobs.append(0.0)
    with pytest.raises(InvalidArgument, match="sampled.logprobs"):
        decode_result(wire)
    wire = encode_result(WorkerResult(1, [1, 2], [5, 6], [-0.5, -1.0], [[(5, -0.5)], [(6, -1)]]))
    wire.sampled.num_top.append(1)
    with pytest.raises(InvalidArgument, match="sampled.num_top"):
        decode_result(wire)
