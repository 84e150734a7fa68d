"""A tensor-parallel group never hangs on a lost rank: every collective is bounded by
``--tensor-parallel-timeout-s``, the idle leader's heartbeat keeps waiting followers alive, and a
rank that sees the group fail exits non-zero (the group restarts as a unit; the scheduler sees
the leader fail like any worker). Real ``python -m worker`` processes, gloo on loopback."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest

from pagedserve.core.step import NewSeq, ScheduledBatch, ScheduledRow, WorkerStep
from pagedserve.core.step_codec import decode_result, encode_step
from protos.pagedserve.v1 import common_pb2
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.tp_group import WorkerRanks, start_worker_ranks

pytestmark = [pytest.mark.external, pytest.mark.any_isa]  # worker processes, gloo
TIMEOUT_S = 4.0
EXIT_WAIT_S = 60.0  # a bound for the test, not a latency claim
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture
def group() -> Iterator[WorkerRanks]:
    ranks = start_worker_ranks(tiny_llama_dir(), 2, timeout_s=TIMEOUT_S,
                               extra_args=("--num-gpu-blocks", "16"))
    try:
        ranks.wait_ready()
        yield ranks
    finally:
        for proc in ranks.procs:  # a stopped rank must be resumed to die
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        ranks.stop()


def _prefill(stub) -> int:  # type: ignore[no-untyped-def]
    step = WorkerStep(step_id=1, new_seqs=[NewSeq(1, PROMPT, len(PROMPT),
                                                   common_pb2.SamplingParams(temperature=0.0))],
                      scheduled=ScheduledBatch.from_rows([ScheduledRow(1, 0, len(PROMPT),
                                                                       new_block_ids=[3])]))
    return decode_result(stub.Step(encode_step(step), timeout=60)).token_ids[0]


def _decode(stub, step_id: int, computed: int) -> None:  # type: ignore[no-untyped-def]
    step = WorkerStep(step_id=step_id, scheduled=ScheduledBatch.from_rows(
        [ScheduledRow(1, computed, 1)]))
    decode_result(stub.Step(encode_step(step), timeout=60))


def _exit_status(proc: subprocess.Popen[bytes]) -> int:
    return proc.wait(EXIT_WAIT_S)


def test_an_idle_group_outlives_its_timeout_on_heartbeats(group: WorkerRanks) -> None:
    stub = group.leader_stub()
    _prefill(stub)
    time.sleep(3 * TIMEOUT_S)  # no step: only the leader's heartbeats reach the follower
    _decode(stub, 2, len(PROMPT))
    assert all(proc.poll() is None for proc in group.procs)


def test_a_killed_follower_fails_the_leaders_step_and_the_leader_exits(
        group: WorkerRanks) -> None:
    stub = group.leader_stub()
    _prefill(stub)
    group.procs[1].kill()
    assert _exit_status(group.procs[1]) == -signal.SIGKILL
    with pytest.raises(grpc.RpcError):  # the step's broadcast or collective fails
        _decode(stub, 2, len(PROMPT))
    assert _exit_status(group.procs[0]) == 1
    assert "tensor-parallel group failed" in group.log(0)


def test_a_hung_follower_fails_the_leader_within_the_collective_timeout(
        group: WorkerRanks) -> None:
    stub = group.leader_stub()
    _prefill(stub)
    group.procs[1].send_signal(signal.SIGSTOP)  # alive, connected, never answers
    with pytest.raises(grpc.RpcError):
        _decode(stub, 2, len(PROMPT))
    assert _exit_status(group.procs[0]) == 1


def test_a_follower_exits_non_zero_when_its_leader_dies(group: WorkerRanks) -> None:
    group.procs[0].kill()
    assert _exit_status(group.procs[1]) == 1
    assert "the group failed" in group.log(1)


def test_a_follower_that_starts_long_after_its_leader_still_joins() -> None:
    """Joining waits ``--tensor-parallel-rendezvous-timeout-s`` (default 600 s), not the
    collective timeout: a restarted group's ranks may come back minutes apart."""
    ranks = start_worker_ranks(tiny_llama_dir(), 2, timeout_s=TIMEOUT_S,
                               extra_args=("--num-gpu-blocks", "16"),
                               follower_delay_s=3 * TIMEOUT_S)
    try:
        ranks.wait_ready()
        stub = ranks.leader_stub()
        _prefill(stub)
        _decode(stub, 2, len(PROMPT))
        assert all(proc.poll() is None for proc in ranks.procs)
    finally:
        ranks.stop()
