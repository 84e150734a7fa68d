"""The Worker applies a step exactly as ``pagedserve.core.step`` orders it: forks, swaps, copies,
block-table replace, its own samples appended (or not, for the scheduler's sequences), and refuses a
bad step without changing anything."""

from __future__ import annotations

import logging

import pytest

from pagedserve.core.errors import InvalidArgument, NotFound
from pagedserve.core.step import NewSeq, ScheduledBatch, ScheduledRow, WorkerResult, WorkerStep
from protos.pagedserve.v1 import common_pb2
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_driver import StepDriver
from tests.support.worker_factory import cpu_worker
from worker.model_runner import ScheduledWork
from worker.worker import Worker

BS = 4
GREEDY = common_pb2.SamplingParams(temperature=0.0)
PROMPT = [11, 22, 33, 44, 55, 66]  # 6 tokens: one full block + a partial one


@pytest.fixture(scope="module")
def worker() -> Worker:
    return cpu_worker(tiny_llama_dir(), block_size=BS, num_gpu_blocks=32,
                      swap_space_gib=0.0001)


@pytest.fixture(autouse=True)
def _reset(worker: Worker) -> None:
    worker.reset()


def _sched(seq_id: int, computed: int, new: int, blocks: list[int] = (), append: list[int] = (),
           replace: bool = False, sample: bool = True) -> ScheduledRow:
    return ScheduledRow(
        seq_id=seq_id, num_computed_tokens=computed, num_new_tokens=new, new_block_ids=list(blocks),
        append_token_ids=list(append), replace_block_table=replace, sample=sample)


def _batch(*rows: ScheduledRow) -> ScheduledBatch:
    return ScheduledBatch.from_rows(rows)


def _token(resp: WorkerResult, seq_id: int) -> int:
    return next(t.token_id for t in resp.rows() if t.seq_id == seq_id)


def _reference(worker: Worker, n: int) -> list[int]:
    seq = StepDriver(worker.step, 32, BS, seed=5).generate([PROMPT], n, GREEDY, first_seq_id=900)
    return seq[0].outputs


def _prefill(worker: Worker, seq_id: int, blocks: list[int], scheduler_appends: bool = False,
             ) -> int:
    resp = worker.step(WorkerStep(
        new_seqs=[NewSeq(seq_id, PROMPT, len(PROMPT), GREEDY,
                         scheduler_appends=scheduler_appends)],
        scheduled=_batch(_sched(seq_id, 0, len(PROMPT), blocks))))
    return _token(resp, seq_id)


def test_fork_shares_full_blocks_and_copies_the_partial_one(worker: Worker) -> None:
    expected = _reference(worker, 3)
    first = _prefill(worker, 1, [3, 7])
    assert first == expected[0]
    # Child: the parent's tokens (its sample included), shares block 3 (full), gets a copy of
    # partial block 7 in block 9.
    resp = worker.step(WorkerStep(
        new_seqs=[NewSeq(2, [], 6, parent_seq_id=1)],
        copies=[(7, 9)],
        scheduled=_batch(_sched(1, 6, 1), _sched(2, 6, 1, blocks=[3, 9], replace=True))))
    assert _token(resp, 1) == _token(resp, 2) == expected[1]
    assert worker.seqs[2].token_ids.tolist() == PROMPT + expected[:2]
    assert worker.seqs[2].block_table == [3, 9]


def test_swap_out_and_back_in_elsewhere_resumes_identically(worker: Worker) -> None:
    expected = _reference(worker, 3)
    _prefill(worker, 1, [2, 5])
    worker.step(WorkerStep(swap_out=[(2, 0), (5, 1)]))
    worker.step(WorkerStep(  # clobber the old device blocks
        new_seqs=[NewSeq(3, [1] * 8, 8, GREEDY)], scheduled=_batch(_sched(3, 0, 8, [2, 5]))))
    resp = worker.step(WorkerStep(
        finished_seq_ids=[3], swap_in=[(0, 11), (1, 12)],
        scheduled=_batch(_sched(1, 6, 1, blocks=[11, 12], replace=True))))
    assert _token(resp, 1) == expected[1]


def test_worker_appends_its_own_samples(worker: Worker) -> None:
    first = _prefill(worker, 1, [0, 1])
    assert worker.seqs[1].token_ids.tolist() == PROMPT + [first]


def test_worker_leaves_the_tokens_of_a_sequence_the_scheduler_appends_to(worker: Worker) -> None:
    expected = _reference(worker, 2)
    first = _prefill(worker, 1, [0, 1], scheduler_appends=True)
    assert worker.seqs[1].num_tokens == len(PROMPT)
    resp = worker.step(WorkerStep(scheduled=_batch(_sched(1, 6, 1, append=[first]))))
    assert _token(resp, 1) == expected[1]
    assert worker.seqs[1].token_ids.tolist() == PROMPT + [first]


@pytest.mark.parametrize(
    "req, error",
    [
        (WorkerStep(scheduled=_batch(_sched(1, 6, 2))), InvalidArgument),
        (WorkerStep(scheduled=_batch(_sched(1, 6, 1, blocks=[99]))), InvalidArgument),
        (WorkerStep(scheduled=_batch(_sched(1, 6, 1), _sched(8, 0, 1))), NotFound),
        (WorkerStep(scheduled=_batch(_sched(1, 6, 2, append=[100000]))), InvalidArgument),
        (WorkerStep(scheduled=_batch(_sched(1, 6, 1)), copies=[(0, 32)]), InvalidArgument),
        (WorkerStep(new_seqs=[NewSeq(1, [1], 0)]), InvalidArgument),
        (WorkerStep(new_seqs=[NewSeq(2, [1], 0, common_pb2.SamplingParams(
            stop_token_ids=[512]))]), InvalidArgument),
    ],
)
def test_bad_step_is_refused_and_changes_nothing(worker: Worker, req, error) -> None:
    _prefill(worker, 1, [0, 1])
    before = (worker.seqs[1].token_ids.tolist(), list(worker.seqs[1].block_table))
    with pytest.raises(error):
        worker.step(req)
    assert (worker.seqs[1].token_ids.tolist(), worker.seqs[1].block_table) == before


def test_seeded_sampling_survives_preemption_by_recompute(worker: Worker) -> None:
    params = common_pb2.SamplingParams(temperature=1.0, seed=77)
    full = StepDriver(worker.step, 32, BS).generate([PROMPT], 8, params)[0].outputs
    head = StepDriver(worker.step, 32, BS).generate([PROMPT], 3, params)[0].outputs
    # Continuation: prompt + generated tokens, prompt length unchanged, recomputed from scratch.
    req = WorkerStep(
        new_seqs=[NewSeq(50, PROMPT + head, len(PROMPT), params)],
        scheduled=_batch(_sched(50, 0, len(PROMPT) + 3, blocks=[20, 21, 22])))
    assert head == full[:3]
    assert _token(worker.step(req), 50) == full[3]


def test_batch_inputs_map_tokens_to_positions_and_slots(worker: Worker) -> None:
    _prefill(worker, 1, [6, 2])  # the worker appends its sample: 7 tokens
    decode = worker.runner.prepare([ScheduledWork(worker.seqs[1], 6, 1, True)])
    assert decode.meta.is_decode_only
    assert decode.positions.tolist() == [6] and decode.meta.slot_mapping.tolist() == [2 * BS + 2]
    mixed = worker.runner.prepare([ScheduledWork(worker.seqs[1], 3, 4, True)])
    assert not mixed.meta.is_decode_only
    assert mixed.positions.tolist() == [3, 4, 5, 6]
    assert mixed.meta.slot_mapping.tolist() == [6 * BS + 3, 2 * BS, 2 * BS + 1, 2 * BS + 2]


def test_the_worker_logs_its_execution_path_once(caplog: pytest.LogCaptureFixture,
                                                 cpu_isa: str | None) -> None:
    with caplog.at_level(logging.INFO, logger="worker.worker"):
        fresh = cpu_worker(tiny_llama_dir(), block_size=BS, num_gpu_blocks=8)
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("execution path: ")]
    assert lines == [f"execution path: {fresh.runner.execution.describe()}"]
    assert lines[0].startswith("execution path: fused_cpu_stack (" if cpu_isa
                               else "execution path: torch (")


def test_the_sampler_knows_the_models_eos_for_min_tokens(worker: Worker) -> None:
    """min_tokens keeps the model's EOS out even under ignore_eos (vLLM's and HF's semantics),
    so the worker's sampler must be given the model's EOS ids, not only each request's stops."""
    assert worker.sampler.eos_token_ids == tuple(worker.model_config.eos_token_ids)
    assert worker.sampler.eos_token_ids
