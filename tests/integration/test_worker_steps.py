"""The Worker applies a StepRequest exactly as worker.proto orders it: forks, swaps, copies,
block-table replace, and refuses a bad step without changing anything."""

from __future__ import annotations

import logging

import pytest

from pagedserve.core.errors import InvalidArgument, NotFound
from pagedserve.core.step_codec import ScheduledRow, add_scheduled, sampled_rows
from protos.pagedserve.v1 import common_pb2, worker_pb2
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


def _batch(*rows: ScheduledRow) -> worker_pb2.ScheduledBatch:
    batch = worker_pb2.ScheduledBatch()
    add_scheduled(batch, rows)
    return batch


def _token(resp: worker_pb2.StepResponse, seq_id: int) -> int:
    return next(t.token_id for t in sampled_rows(resp.sampled) if t.seq_id == seq_id)


def _reference(worker: Worker, n: int) -> list[int]:
    seq = StepDriver(worker.step, 32, BS, seed=5).generate([PROMPT], n, GREEDY, first_seq_id=900)
    return seq[0].outputs


def _prefill(worker: Worker, seq_id: int, blocks: list[int]) -> int:
    resp = worker.step(worker_pb2.StepRequest(
        new_seqs=[worker_pb2.NewSequence(seq_id=seq_id, token_ids=PROMPT,
                                         num_prompt_tokens=len(PROMPT), params=GREEDY)],
        scheduled=_batch(_sched(seq_id, 0, len(PROMPT), blocks))))
    return _token(resp, seq_id)


def test_fork_shares_full_blocks_and_copies_the_partial_one(worker: Worker) -> None:
    expected = _reference(worker, 3)
    first = _prefill(worker, 1, [3, 7])
    assert first == expected[0]
    # Child: same tokens, shares block 3 (full), gets a copy of partial block 7 in block 9.
    resp = worker.step(worker_pb2.StepRequest(
        new_seqs=[worker_pb2.NewSequence(seq_id=2, parent_seq_id=1, num_prompt_tokens=6)],
        copies=[worker_pb2.BlockMapping(src=7, dst=9)],
        scheduled=_batch(_sched(1, 6, 1, append=[first]),
                         _sched(2, 6, 1, blocks=[3, 9], append=[first], replace=True))))
    assert _token(resp, 1) == _token(resp, 2) == expected[1]
    assert worker.seqs[2].token_ids.tolist() == PROMPT + [first]
    assert worker.seqs[2].block_table == [3, 9]


def test_swap_out_and_back_in_elsewhere_resumes_identically(worker: Worker) -> None:
    expected = _reference(worker, 3)
    first = _prefill(worker, 1, [2, 5])
    worker.step(worker_pb2.StepRequest(swap_out=[worker_pb2.BlockMapping(src=2, dst=0),
                                                 worker_pb2.BlockMapping(src=5, dst=1)]))
    worker.step(worker_pb2.StepRequest(  # clobber the old device blocks
        new_seqs=[worker_pb2.NewSequence(seq_id=3, token_ids=[1] * 8, num_prompt_tokens=8,
                                         params=GREEDY)],
        scheduled=_batch(_sched(3, 0, 8, [2, 5])), finished_seq_ids=[]))
    resp = worker.step(worker_pb2.StepRequest(
        finished_seq_ids=[3],
        swap_in=[worker_pb2.BlockMapping(src=0, dst=11), worker_pb2.BlockMapping(src=1, dst=12)],
        scheduled=_batch(_sched(1, 6, 1, blocks=[11, 12], append=[first], replace=True))))
    assert _token(resp, 1) == expected[1]


def test_worker_never_appends_its_own_samples(worker: Worker) -> None:
    _prefill(worker, 1, [0, 1])
    assert worker.seqs[1].num_tokens == len(PROMPT)


@pytest.mark.parametrize(
    "req, error",
    [
        (worker_pb2.StepRequest(scheduled=_batch(_sched(1, 6, 2, append=[5]))), InvalidArgument),
        (worker_pb2.StepRequest(scheduled=_batch(_sched(1, 6, 1, append=[5], blocks=[99]))),
         InvalidArgument),
        (worker_pb2.StepRequest(scheduled=_batch(_sched(1, 6, 1, append=[5]), _sched(8, 0, 1))),
         NotFound),
        (worker_pb2.StepRequest(scheduled=_batch(_sched(1, 6, 1, append=[100000]))),
         InvalidArgument),
        (worker_pb2.StepRequest(scheduled=_batch(_sched(1, 6, 1, append=[5])),
                                copies=[worker_pb2.BlockMapping(src=0, dst=32)]),
         InvalidArgument),
        (worker_pb2.StepRequest(new_seqs=[worker_pb2.NewSequence(seq_id=1, token_ids=[1])]),
         InvalidArgument),
        (worker_pb2.StepRequest(new_seqs=[worker_pb2.NewSequence(
            seq_id=2, token_ids=[1], params=common_pb2.SamplingParams(stop_token_ids=[512]))]),
         InvalidArgument),
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
    req = worker_pb2.StepRequest(
        new_seqs=[worker_pb2.NewSequence(seq_id=50, token_ids=PROMPT + head,
                                         num_prompt_tokens=len(PROMPT), params=params)],
        scheduled=_batch(_sched(50, 0, len(PROMPT) + 3, blocks=[20, 21, 22])))
    assert head == full[:3]
    assert _token(worker.step(req), 50) == full[3]


def test_batch_inputs_map_tokens_to_positions_and_slots(worker: Worker) -> None:
    first = _prefill(worker, 1, [6, 2])
    worker.seqs[1].append([first])
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
