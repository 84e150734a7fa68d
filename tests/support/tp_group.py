"""Real worker processes for tensor-parallel tests, and a real scheduler that steps them.

``start_worker_ranks(model, size)`` runs ``python -m worker`` once per rank on loopback (size 1:
an ordinary worker, no tensor-parallel flags), exactly as deployed; ``SchedulerThread`` runs the
scheduler's gRPC server on an event loop in a background thread, connected to one worker (a
group's leader), and submits requests with an ordinary client. Both clean up after themselves:
``stop`` ends every process they started (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.pagedserve.v1 import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from scheduler.config import BatchingConfig, CacheConfig, SchedulerConfig, ServerConfig
from scheduler.server import SchedulerServer, build_server

READY_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class WorkerRanks:
    """The processes of one worker (size 1) or one tensor-parallel group, rank 0 first."""

    procs: list[subprocess.Popen[bytes]]
    ports: list[int]
    log_dir: Path
    _channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def leader_address(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"

    def leader_stub(self) -> worker_pb2_grpc.WorkerStub:
        channel = grpc.insecure_channel(self.leader_address)
        self._channels.append(channel)
        return worker_pb2_grpc.WorkerStub(channel)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> worker_pb2.WorkerInfo:
        """Every follower's health SERVING and the leader's ``GetInfo`` answering."""
        deadline = time.monotonic() + timeout_s
        for rank, port in enumerate(self.ports):
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            try:
                health = health_pb2_grpc.HealthStub(channel)
                while True:
                    self._check_alive(rank)
                    try:
                        status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                        if status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"rank {rank} not ready; log: {self.log(rank)}")
                    time.sleep(0.2)
            finally:
                channel.close()
        return self.leader_stub().GetInfo(worker_pb2.WorkerInfoRequest(), timeout=10)

    def _check_alive(self, rank: int) -> None:
        if self.procs[rank].poll() is not None:
            raise RuntimeError(f"rank {rank} exited {self.procs[rank].returncode}: "
                               f"{self.log(rank)}")

    def log(self, rank: int) -> str:
        return (self.log_dir / f"rank{rank}.log").read_text()[-4000:]

    def stop(self) -> None:
        for channel in self._channels:
            channel.close()
        for proc in self.procs:  # the leader first: it shuts its followers down
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def start_worker_ranks(model: str | Path, size: int, *, timeout_s: float = 30.0,
                       extra_args: tuple[str, ...] = (), follower_delay_s: float = 0.0
                       ) -> WorkerRanks:
    """Starts ``size`` ``python -m worker`` processes (fp32 CPU, torch attention); see module
    docstring. ``extra_args`` go to every rank (pool sizes, block size); the followers start
    ``follower_delay_s`` after the leader (a group whose ranks restart at different times)."""
    master = f"127.0.0.1:{free_port()}"
    ports = [free_port() for _ in range(size)]
    log_dir = Path(tempfile.mkdtemp(prefix="tp-ranks-"))
    procs = []
    for rank, port in enumerate(ports):
        if rank == 1:
            time.sleep(follower_delay_s)
        args = [sys.executable, "-m", "worker", "--model", str(model), "--device", "cpu",
                "--dtype", "float32", "--attention-backend", "torch", "--seed", "0",
                "--port", str(port), "--worker-id", f"tp{size}", *extra_args]
        if size > 1:
            args += ["--tensor-parallel-size", str(size), "--tensor-parallel-rank", str(rank),
                     "--tensor-parallel-master", master,
                     "--tensor-parallel-timeout-s", str(timeout_s)]
        with open(log_dir / f"rank{rank}.log", "wb") as log:
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={
                **os.environ, "PYTHONUNBUFFERED": "1",
                # ranks sharing the CPU divide its cores, as ``torchrun`` makes them
                "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // size))}))
    return WorkerRanks(procs, ports, log_dir)


@dataclass
class Output:
    """One of a request's outputs as the scheduler streamed it."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)
    num_cached_tokens: int = 0
    finish_reason: int = 0


class SchedulerThread:
    """A real scheduler (``scheduler.server.build_server``) stepping the worker at ``address``."""

    def __init__(self, address: str, block_size: int = 16,
                 max_num_batched_tokens: int = 2048) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = SchedulerConfig(
            batching=BatchingConfig(max_num_batched_tokens=max_num_batched_tokens),
            cache=CacheConfig(), server=ServerConfig(host="127.0.0.1", port=0),
            worker_addresses=(address,), log_interval_seconds=0)
        self.server: SchedulerServer = self._run(build_server(config))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self._ids = iter(range(1 << 30))

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def generate(self, prompt: list[int], **params: object) -> list[Output]:
        """The request's outputs by index, as streamed (beam search's last replacement)."""
        request = scheduler_pb2.SubmitRequest(
            request_id=f"r{next(self._ids)}", prompt_token_ids=prompt,
            params=common_pb2.SamplingParams(**params))  # type: ignore[arg-type]
        outputs: dict[int, Output] = {}
        for response in self.stub.Submit(request, timeout=300):
            for seq in response.outputs:
                out = outputs.setdefault(seq.index, Output())
                if seq.replaces:
                    out.token_ids, out.logprobs = [], []
                out.token_ids.extend(seq.token_ids)
                out.logprobs.extend(seq.logprobs)
                out.num_cached_tokens = max(out.num_cached_tokens, seq.num_cached_tokens)
                out.finish_reason = seq.finish_reason or out.finish_reason
        return [outputs[i] for i in sorted(outputs)]

    def generate_concurrently(self, prompts: list[list[int]], **params: object
                              ) -> list[list[Output]]:
        results: list[list[Output]] = [[] for _ in prompts]

        def one(i: int) -> None:
            results[i] = self.generate(prompts[i], **params)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        return results

    def stats(self) -> scheduler_pb2.SchedulerStats:
        return self.stub.GetStats(scheduler_pb2.StatsRequest(), timeout=10)

    def stop(self) -> None:
        self.channel.close()
        self._run(self.server.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
