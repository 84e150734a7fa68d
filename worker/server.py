"""Builds and runs the worker's gRPC server: Worker service, health, reflection, graceful stop.

In a tensor-parallel group (``worker/parallel.py``) the leader (rank 0) serves exactly this; a
follower serves only ``grpc.health.v1`` (SERVING once it has joined the group and loaded its
slice) and its metrics, and runs the leader's commands. A rank whose group fails exits non-zero:
the group restarts as a unit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health

from pagedserve.core.grpc_util import (
    WORKER_SERVER_OPTIONS,
    add_health_and_reflection,
    add_port,
    identity_interceptors,
    set_serving,
)
from pagedserve.core.metrics_server import MetricsServer, new_registry, serve_metrics
from protos.pagedserve.v1 import worker_pb2, worker_pb2_grpc
from worker.config import WorkerConfig
from worker.metrics import WorkerMetrics
from worker.servicer import WorkerServicer
from worker.worker import Worker

logger = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


@dataclass
class WorkerServer:
    """A started worker server and what ``stop`` must release."""

    server: grpc.aio.Server
    port: int
    worker: Worker
    health: health.aio.HealthServicer
    grace_s: float
    metrics_server: MetricsServer | None = None

    @property
    def metrics_port(self) -> int | None:
        """Bound /metrics port, or None when metrics are off."""
        return self.metrics_server.port if self.metrics_server is not None else None

    async def stop(self) -> None:
        """NOT_SERVING first so the scheduler and probes drain, then in-flight steps get
        ``grace_s`` to finish; a group's leader then shuts its followers down."""
        await set_serving(self.health, [SERVICE_NAME], False)
        await self.server.stop(self.grace_s)
        await asyncio.to_thread(self.worker.close)
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)


async def start_worker_server(cfg: WorkerConfig, worker: Worker | None = None) -> WorkerServer:
    """Loads the model (unless ``worker`` is given, e.g. shared in tests) and starts serving."""
    if worker is None:
        worker = await asyncio.to_thread(Worker, cfg)
    tls = cfg.server.tls
    server = grpc.aio.server(options=WORKER_SERVER_OPTIONS, interceptors=identity_interceptors(
        tls, SERVICE_NAME, cfg.server.client_identities))
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(worker), server)
    health_servicer = add_health_and_reflection(server, [SERVICE_NAME])
    port = add_port(server, f"{cfg.server.host}:{cfg.server.port}", tls)
    await server.start()
    await set_serving(health_servicer, [SERVICE_NAME], True)
    info = worker.info()
    logger.info("worker %s serving %s on %s:%d (%s, %s backend, %d KV blocks, %s)",
                info.worker_id, info.model, cfg.server.host, port, info.device,
                info.attention_backend, info.num_gpu_blocks, _security(cfg))
    metrics_server = _start_metrics(cfg, worker) if cfg.server.metrics_port is not None else None
    return WorkerServer(server, port, worker, health_servicer, cfg.server.grace_seconds,
                        metrics_server)


async def build_server(
    cfg: WorkerConfig, worker: Worker | None = None
) -> tuple[grpc.aio.Server, int, Worker]:
    """``(server, port, worker)``, started; bind port 0 in tests."""
    started = await start_worker_server(cfg, worker)
    return started.server, started.port, started.worker


async def serve(cfg: WorkerConfig) -> int:
    """Runs until SIGTERM/SIGINT, then stops gracefully; returns the exit status (1: this
    rank's tensor-parallel group failed)."""
    if not cfg.parallel.is_leader:
        return await serve_follower(cfg)
    started = await start_worker_server(cfg)
    group_failed = asyncio.Event()
    if started.worker.group is not None:
        started.worker.group.on_failure(_setter(group_failed))
    stopping = _stop_on_signals()
    await _first(stopping.wait(), group_failed.wait())
    if group_failed.is_set():
        logger.error("tensor-parallel group failed: leader exiting (the group restarts as a "
                     "unit)")
        await started.server.stop(0)
        return 1
    logger.info("worker stopping (grace %.1fs)", cfg.server.grace_seconds)
    await started.stop()
    return 0


async def serve_follower(cfg: WorkerConfig) -> int:
    """A follower rank: joins the group and loads its slice (the ``Worker``), serves health
    (and metrics), runs the leader's commands in a thread until the leader shuts the group down
    (0), the group fails (1) or a signal stops it (0)."""
    worker = await asyncio.to_thread(Worker, cfg)
    server = grpc.aio.server(options=WORKER_SERVER_OPTIONS)
    health_servicer = add_health_and_reflection(server, [])
    port = add_port(server, f"{cfg.server.host}:{cfg.server.port}", cfg.server.tls)
    await server.start()
    await set_serving(health_servicer, [], True)
    metrics_server = _start_metrics(cfg, worker) if cfg.server.metrics_port is not None else None
    logger.info("tensor-parallel follower rank %d serving health on %s:%d",
                cfg.parallel.rank, cfg.server.host, port)
    done = asyncio.Event()
    failed = threading.Event()
    threading.Thread(target=_follow, args=(worker, failed, _setter(done)), daemon=True,
                     name="tp-follower").start()
    await _first(_stop_on_signals().wait(), done.wait())
    await set_serving(health_servicer, [], False)
    await server.stop(0)
    if metrics_server is not None:
        await asyncio.to_thread(metrics_server.stop)
    return 1 if failed.is_set() else 0


def _follow(worker: Worker, failed: threading.Event, done: Callable[[], None]) -> None:
    try:
        worker.follow_leader()
        worker.close()
    except Exception:
        logger.exception("tensor-parallel follower exiting: the group failed")
        failed.set()
    finally:
        done()


def _setter(event: asyncio.Event) -> Callable[[], None]:
    """A thread-safe way to set ``event`` of the running loop."""
    loop = asyncio.get_running_loop()

    def set_event() -> None:
        loop.call_soon_threadsafe(event.set)

    return set_event


def _stop_on_signals() -> asyncio.Event:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    return stopping


async def _first(*waits: Coroutine[object, object, object]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()


def _security(cfg: WorkerConfig) -> str:
    tls = cfg.server.tls
    if not tls.enabled:
        return "plaintext"
    if not tls.mutual:
        return "TLS"
    who = ", ".join(cfg.server.client_identities) or "any client certificate"
    return f"mTLS, Worker service for {who}"


def _start_metrics(cfg: WorkerConfig, worker: Worker) -> MetricsServer:
    """One registry per server (tests run several workers in one process)."""
    registry = new_registry()
    metrics = WorkerMetrics(registry, worker.info().worker_id, worker.placement.device,
                            worker.rank, cfg.parallel.size)
    metrics.set_pools(worker.cache.num_gpu_blocks, worker.cache.num_cpu_blocks)
    metrics.set_weight_bytes(worker.weight_bytes)
    metrics.set_backend(worker.placement.backend.name, str(worker.placement.device))
    metrics.set_cpu_kernels(worker.cpu_kernels.isa, worker.cpu_kernels.available,
                            worker.runner.execution.weight_format)
    worker.metrics = metrics
    assert cfg.server.metrics_port is not None
    server = serve_metrics(cfg.server.metrics_port, registry, cfg.server.host)
    logger.info("worker metrics on %s", server.url)
    return server
