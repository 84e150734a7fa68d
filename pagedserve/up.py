"""``pagedserve up``: router + scheduler + N workers as separate processes on this machine.

Starts workers, then the scheduler, then the router, each once the previous ones answer
``grpc.health.v1`` SERVING; serves until Ctrl-C/SIGTERM or until any process dies; then stops the
router first and the workers last, each with SIGTERM (graceful) and SIGKILL after a grace period.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF directory or .gguf file (default: packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--workers", type=int, default=1, help="number of worker processes")
    parser.add_argument("--host", default="127.0.0.1", help="router bind address")
    parser.add_argument("--port", type=int, default=50051, help="router port")
    parser.add_argument("--scheduler-port", type=int, default=0, help="0 = a free port")
    parser.add_argument("--kv-cache-memory-gib", type=float, default=2.0)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kvstore", default="memory://")
    parser.add_argument("--preemption-mode", default="swap", choices=["swap", "recompute"])
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--metrics", action="store_true",
                        help="serve Prometheus metrics (ports printed at start)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--log-level", default="INFO")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _module_of(proc: subprocess.Popen[bytes]) -> str:
    """The module a child runs: ``Supervisor.spawn`` starts each as
    ``[python, "-m", module, ...]``."""
    argv = proc.args
    assert isinstance(argv, list) and isinstance(argv[2], str), "children come from spawn()"
    return argv[2]


def wait_serving(address: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{_module_of(proc)} exited with code {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} not serving after {timeout:.0f}s")


class Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, module: str, argv: list[str]) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", module, *argv, "--log-level", self.args.log_level]
        proc = subprocess.Popen(cmd)
        self.procs.append(proc)
        return proc

    def start(self) -> str:
        a = self.args
        model = ["--model", a.model] if a.model else []
        metrics: dict[str, int] = {}
        worker_addrs = []
        for i in range(a.workers):
            port = free_port()
            argv = [*model, "--port", str(port), "--worker-id", f"worker-{i}",
                    "--kv-cache-memory-gib", str(a.kv_cache_memory_gib),
                    "--block-size", str(a.block_size),
                    "--max-num-batched-tokens", str(a.max_num_batched_tokens)]
            if a.metrics:
                metrics[f"worker-{i}"] = free_port()
                argv += ["--metrics-port", str(metrics[f"worker-{i}"])]
            worker_addrs.append((f"127.0.0.1:{port}", self.spawn("worker", argv)))
        for addr, proc in worker_addrs:
            wait_serving(addr, proc, a.startup_timeout)
        sched_port = a.scheduler_port or free_port()
        argv = ["--port", str(sched_port), "--kvstore", a.kvstore,
                "--preemption-mode", a.preemption_mode,
                "--max-num-batched-tokens", str(a.max_num_batched_tokens)]
        for addr, _ in worker_addrs:
            argv += ["--worker", addr]
        if a.metrics:
            metrics["scheduler"] = free_port()
            argv += ["--metrics-port", str(metrics["scheduler"])]
        sched = self.spawn("scheduler", argv)
        wait_serving(f"127.0.0.1:{sched_port}", sched, a.startup_timeout)
        argv = [*model, "--host", a.host, "--port", str(a.port),
                "--scheduler-address", f"127.0.0.1:{sched_port}"]
        if a.metrics:
            metrics["router"] = free_port()
            argv += ["--metrics-port", str(metrics["router"])]
        router = self.spawn("router", argv)
        address = f"{'127.0.0.1' if a.host in ('0.0.0.0', '') else a.host}:{a.port}"
        wait_serving(address, router, a.startup_timeout)
        for name, port in metrics.items():
            print(f"metrics: {name} http://127.0.0.1:{port}/metrics", flush=True)
        return address

    def wait(self) -> int:
        stop = {"signal": False}

        def on_signal(signum: int, frame: object) -> None:
            stop["signal"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop["signal"]:
            for proc in self.procs:
                if proc.poll() is not None:
                    logger.error("%s exited with code %s; stopping the cluster", _module_of(proc),
                                 proc.returncode)
                    return 1
            time.sleep(0.3)
        return 0

    def shutdown(self, grace: float = 15.0) -> None:
        for proc in reversed(self.procs):  # router first, workers last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def run_up(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sup = Supervisor(args)
    try:
        address = sup.start()
        print(f"pagedserve is up: router at {address} "
              f"(try: pagedserve generate --address {address} \"What is the capital of France?\")",
              flush=True)
        return sup.wait()
    except (RuntimeError, TimeoutError) as exc:
        logger.error("startup failed: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        sup.shutdown()
        print("pagedserve stopped", flush=True)
