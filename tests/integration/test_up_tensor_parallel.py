"""Data x tensor parallel under one scheduler, as a user runs it: ``pagedserve up --workers 2
--tensor-parallel-size 2`` (two groups of two CPU ranks each, gloo, a tiny random Llama).

Greedy streams run on both groups; one rank that is not a leader is SIGKILLed mid-run. Its group
fails as a unit (``up`` stops the leader and restarts both ranks), every stream completes on the
surviving group with exactly the tokens of an uninterrupted run, and the group comes back: the
restarted leader is a new worker instance that the scheduler re-admits and steps again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from protos.pagedserve.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.integration.test_cli_up import _ctrl_c, _free_port, _wait_for
from tests.support.tiny_llama import tiny_llama_dir

pytestmark = [pytest.mark.external,  # a service binary, the packaged model or a subprocess
              pytest.mark.any_isa]

NUM_STREAMS = 6
MAX_TOKENS = 160
KILL_AFTER_TOKENS = 12  # every stream has streamed this many when the rank dies


def _prompt(i: int) -> list[int]:
    return [5 + i, 17, 99, 123 + i, 7, 8, 40 + 3 * i]


def _request(i: int) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=_prompt(i)),
        params=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True,
                                         temperature=0.0))


class Streams:
    """``NUM_STREAMS`` greedy streams at once, one thread each; the tokens each got so far."""

    def __init__(self, stub: generation_pb2_grpc.GenerationStub) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(NUM_STREAMS)]
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(stub, i), daemon=True)
                        for i in range(NUM_STREAMS)]
        for t in self.threads:
            t.start()

    def _run(self, stub: generation_pb2_grpc.GenerationStub, i: int) -> None:
        try:
            for message in stub.Generate(_request(i), timeout=600):
                self.tokens[i].extend(message.token_ids)
        except grpc.RpcError as exc:
            self.errors.append(exc)

    def join(self) -> list[list[int]]:
        for t in self.threads:
            t.join(600)
        assert not any(t.is_alive() for t in self.threads), "a stream did not end"
        assert not self.errors, self.errors
        return self.tokens


def _pids(log: Path) -> dict[str, int]:
    """``up``'s processes by name, from its "started NAME (pid N)" lines (latest start)."""
    pids = {}
    for line in log.read_text().splitlines():
        if line.startswith("up: started "):
            name, rest = line[len("up: started "):].split(" (pid ", 1)
            pids[name] = int(rest.split(")")[0])
    return pids


def _address(log: Path, name: str) -> str:
    line = next(x for x in log.read_text().splitlines() if x.startswith(f"up: started {name} "))
    return line.rsplit("to serve on ", 1)[1]


def test_a_killed_rank_fails_its_group_and_streams_finish_exact_on_the_other(tmp_path):
    model = tiny_llama_dir()
    port, http_port, sched_port = _free_port(), _free_port(), _free_port()
    log = tmp_path / "up.log"
    with open(log, "w+") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.cli", "up", "--model", str(model),
             "--workers", "2", "--tensor-parallel-size", "2", "--port", str(port),
             "--http-port", str(http_port), "--scheduler-port", str(sched_port),
             "--kv-cache-memory-gib", "0.01", "--log-level", "WARNING"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    router = grpc.insecure_channel(f"127.0.0.1:{port}")
    scheduler = grpc.insecure_channel(f"127.0.0.1:{sched_port}")
    generation = generation_pb2_grpc.GenerationStub(router)
    stats = scheduler_pb2_grpc.SchedulerStub(scheduler)

    def workers() -> dict[str, scheduler_pb2.WorkerStats]:
        return {w.worker_id: w for w in stats.GetStats(scheduler_pb2.StatsRequest(),
                                                        timeout=10).workers}

    def instance(address: str) -> str:
        with grpc.insecure_channel(address) as channel:
            return str(worker_pb2_grpc.WorkerStub(channel).GetInfo(
                worker_pb2.WorkerInfoRequest(), timeout=10).instance_id)

    try:
        _wait_for(lambda: "pagedserve is up" in log.read_text(), "cluster did not start", log,
                  timeout=300)
        text = log.read_text()
        for g in range(2):
            assert f"up: worker {g} ready: all 2 ranks serve, leader on " in text, text
        leader, follower = _address(log, "worker-0-rank0"), _address(log, "worker-0-rank1")
        # The scheduler sees groups: the two leaders, no follower.
        assert set(workers()) == {leader, _address(log, "worker-1-rank0")}
        with grpc.insecure_channel(follower) as channel:  # a follower serves health only
            with pytest.raises(grpc.RpcError) as refused:
                worker_pb2_grpc.WorkerStub(channel).GetInfo(worker_pb2.WorkerInfoRequest(),
                                                            timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        old_instance = instance(leader)

        reference = Streams(generation).join()  # uninterrupted
        assert all(len(t) == MAX_TOKENS for t in reference)

        streams = Streams(generation)
        _wait_for(lambda: min(map(len, streams.tokens)) >= KILL_AFTER_TOKENS,
                  "the streams did not start", log)
        assert max(map(len, streams.tokens)) < MAX_TOKENS, "a stream ended before the kill"
        assert all(w.num_free_blocks < w.num_blocks for w in workers().values()), \
            "the streams do not run on both groups: the kill would test nothing"
        pid = _pids(log)["worker-0-rank1"]
        os.kill(pid, signal.SIGKILL)
        assert streams.join() == reference

        _wait_for(lambda: "up: worker 0 serving again on" in log.read_text(),
                  "worker group 0 did not come back", log)
        text = log.read_text()
        assert f"up: worker-0-rank1 (pid {pid}) exited with code -9" in text
        assert "up: restarted worker 0 (worker-0-rank0 pid " in text
        assert instance(leader) != old_instance  # the scheduler re-admits a new instance
        before = workers()[leader].num_steps

        def stepped_again() -> bool:
            assert Streams(generation).join() == reference
            w = workers()[leader]
            return w.healthy and w.num_steps > before

        _wait_for(stepped_again, "the restarted group was not used again", log, timeout=120)
    finally:
        router.close()
        scheduler.close()
        code = _ctrl_c(proc)
    assert code == 0, log.read_text()
    leftover = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "child processes left running"
