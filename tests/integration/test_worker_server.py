"""A real grpc.aio worker server on 127.0.0.1:0 behaves like the in-process Worker."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.core.grpc_util import CHANNEL_OPTIONS
from pagedserve.core.step import NewSeq, ScheduledBatch, ScheduledRow, WorkerResult, WorkerStep
from pagedserve.core.step_codec import decode_result, encode_step
from protos.pagedserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_driver import StepDriver
from tests.support.worker_factory import cpu_worker, cpu_worker_config
from worker.server import SERVICE_NAME, start_worker_server

PROMPTS = [[5, 9, 14, 200, 31], [77, 3, 4]]
PARAMS = common_pb2.SamplingParams(temperature=0.8, top_k=20, seed=42, logprobs=3)


def _run(coro):
    return asyncio.run(coro)


async def _served_session(path) -> tuple[worker_pb2.WorkerInfo, list, str, list]:
    started = await start_worker_server(cpu_worker_config(path, block_size=4),
                                        cpu_worker(path, block_size=4))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{started.port}", options=CHANNEL_OPTIONS)
    try:
        stub = worker_pb2_grpc.WorkerStub(channel)
        info = await stub.GetInfo(worker_pb2.WorkerInfoRequest(), timeout=10)
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        requests, responses = await _drive_over_grpc(stub)
        bad = await _bad_step_code(stub)
        await stub.Reset(worker_pb2.ResetRequest(), timeout=10)
        return info, responses, health_pb2.HealthCheckResponse.ServingStatus.Name(status.status), [
            requests, bad]
    finally:
        await channel.close()
        await started.stop()


async def _drive_over_grpc(stub: worker_pb2_grpc.WorkerStub) -> tuple[list, list]:
    """Records the steps an in-thread driver would send, sending them over gRPC."""
    responses: list[WorkerResult] = []
    loop = asyncio.get_running_loop()

    async def call(req: WorkerStep) -> worker_pb2.StepResponse:
        return await stub.Step(encode_step(req), timeout=30)  # made on the loop

    def step(req: WorkerStep) -> WorkerResult:
        resp = decode_result(asyncio.run_coroutine_threadsafe(call(req), loop).result())
        responses.append(resp)
        return resp

    driver = StepDriver(step, num_blocks=64, block_size=4, seed=3)
    await asyncio.to_thread(driver.generate, PROMPTS, 6, PARAMS)
    return driver.requests, responses


async def _bad_step_code(stub: worker_pb2_grpc.WorkerStub) -> grpc.StatusCode:
    req = encode_step(WorkerStep(scheduled=ScheduledBatch.from_rows(
        [ScheduledRow(seq_id=999, num_new_tokens=1)])))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Step(req, timeout=10)
    return err.value.code()


def test_grpc_worker_serves_info_health_and_same_tokens_as_in_process() -> None:
    path = tiny_llama_dir()
    info, responses, health, (requests, bad_code) = _run(_served_session(path))

    assert health == "SERVING"
    assert info.worker_id == "test-worker" and info.block_size == 4
    assert info.num_gpu_blocks == 64 and info.vocab_size == 512
    assert list(info.eos_token_ids) == [0] and info.attention_backend == "torch"
    assert info.device == "cpu"
    # The step it was started for, which the scheduler checks its own budget against.
    assert (info.max_num_batched_tokens, info.max_num_seqs) == (2048, 256)
    assert bad_code == grpc.StatusCode.NOT_FOUND

    local = cpu_worker(path, block_size=4)
    local_responses = [local.step(req) for req in requests]
    sampled = [[(t.seq_id, t.token_id) for t in r.rows()] for r in responses]
    assert sampled == [[(t.seq_id, t.token_id) for t in r.rows()] for r in local_responses]
    assert sum(len(s) for s in sampled) == 6 * len(PROMPTS)
    first = responses[0].rows()[0]
    assert len(first.top) == 3 and first.logprob <= 0.0
    assert responses[0].forward_seconds > 0.0


def test_a_step_planned_for_another_worker_instance_is_refused() -> None:
    """The scheduler's handle names the worker instance it planned each step for; a worker
    restarted behind the same address (a new instance, empty KV memory) refuses such a step with
    FAILED_PRECONDITION instead of computing on blocks that do not hold what the plan assumes."""
    from pagedserve.core.errors import Unavailable
    from scheduler.worker_handle import GrpcWorkerHandle

    path = tiny_llama_dir()

    async def session() -> None:
        started = await start_worker_server(cpu_worker_config(path, block_size=4),
                                            cpu_worker(path, block_size=4))
        handle = GrpcWorkerHandle(f"127.0.0.1:{started.port}")
        params = common_pb2.SamplingParams(temperature=0.0)

        def step(seq_id: int, block: int) -> WorkerStep:
            return WorkerStep(new_seqs=[NewSeq(seq_id, [5, 9, 14], 3, params)],
                              scheduled=ScheduledBatch.from_rows([ScheduledRow(
                                  seq_id=seq_id, num_new_tokens=3, new_block_ids=[block])]))

        try:
            info = await handle.info()
            await handle.step(step(1, 0))  # planned for the instance it knows: served
            started.worker.instance_id = "a-restarted-instance"  # what a restart changes
            with pytest.raises(Unavailable, match="FAILED_PRECONDITION.*" + info.instance_id):
                await handle.step(step(2, 1))
            assert 2 not in started.worker.seqs  # refused before anything ran
            await handle.info()  # a rejoin learns the new instance: its steps are served again
            await handle.step(step(2, 1))
        finally:
            await handle.close()
            await started.stop()

    _run(session())


def test_the_grpc_handle_tells_a_refused_step_from_a_worker_fault():
    """A worker that refuses a step names the sequence at fault (the scheduler fails only its
    request and keeps the worker); one that is gone is ``Unavailable``, not a ``WorkerFault``:
    nobody's doing, so it counts against no request."""
    from pagedserve.core.errors import StepRefused, Unavailable, WorkerFault
    from scheduler.worker_handle import GrpcWorkerHandle

    path = tiny_llama_dir()

    async def main():
        started = await start_worker_server(cpu_worker_config(path, block_size=4),
                                            cpu_worker(path, block_size=4))
        handle = GrpcWorkerHandle(f"127.0.0.1:{started.port}")
        bad = WorkerStep(step_id=1, new_seqs=[NewSeq(
            41, [5, 6], 2, common_pb2.SamplingParams(stop_token_ids=[10**6]))])
        try:
            with pytest.raises(StepRefused) as refused:
                await handle.step(bad)
            await started.stop()
            with pytest.raises(Unavailable) as gone:
                await handle.step(WorkerStep(step_id=3))
            assert not isinstance(gone.value, WorkerFault)
        finally:
            await handle.close()
        return refused.value

    refused = _run(main())
    assert refused.seq_id == 41 and "stop_token_ids" in str(refused)


def test_a_hung_worker_fails_its_step_by_keepalive_not_at_the_step_timeout() -> None:
    """A worker process that stops answering (SIGSTOP: no connection reset tells anyone) fails
    the scheduler's in-flight step through the worker channel's keepalive, well before the step
    timeout (600 s here), so its requests can move to another worker. The bound below only keeps
    a broken keepalive from hanging the suite; how soon it is noticed is printed, not asserted."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from pagedserve.core.errors import Unavailable
    from scheduler.worker_handle import GrpcWorkerHandle

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "--model", str(tiny_llama_dir()), "--port", str(port),
         "--block-size", "4", "--kv-cache-memory-gib", "0.01", "--swap-space-gib", "0",
         "--log-level", "WARNING"])

    async def session() -> tuple[float, BaseException]:
        handle = GrpcWorkerHandle(f"127.0.0.1:{port}", step_timeout=600.0)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    await handle.info()
                    break
                except Unavailable:
                    assert proc.poll() is None and time.monotonic() < deadline, "no worker"
                    await asyncio.sleep(0.3)
            os.kill(proc.pid, signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(Unavailable) as gone:
                await handle.step(WorkerStep(step_id=1))
            return time.monotonic() - started, gone.value
        finally:
            await handle.close()

    try:
        elapsed, exc = _run(asyncio.wait_for(session(), 240))
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
    print(f"hung worker noticed after {elapsed:.2f} s: {exc}")
    assert "UNAVAILABLE" in str(exc)
