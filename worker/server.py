"""Builds and runs the worker's gRPC server: Worker service, health, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health

from pagedserve.grpc_util import CHANNEL_OPTIONS, add_health_and_reflection, set_serving
from protos.pagedserve.v1 import worker_pb2, worker_pb2_grpc
from worker.config import WorkerConfig
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

    async def stop(self) -> None:
        """NOT_SERVING first so the scheduler and probes drain, then in-flight steps get
        ``grace_s`` to finish."""
        await set_serving(self.health, [SERVICE_NAME], False)
        await self.server.stop(self.grace_s)


async def start_worker_server(cfg: WorkerConfig, worker: Worker | None = None) -> WorkerServer:
    """Loads the model (unless ``worker`` is given, e.g. shared in tests) and starts serving."""
    if worker is None:
        worker = await asyncio.to_thread(Worker, cfg)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(worker), server)
    health_servicer = add_health_and_reflection(server, [SERVICE_NAME])
    port = server.add_insecure_port(f"{cfg.server.host}:{cfg.server.port}")
    await server.start()
    await set_serving(health_servicer, [SERVICE_NAME], True)
    info = worker.info()
    logger.info("worker %s serving %s on %s:%d (%s, %s backend, %d KV blocks)", info.worker_id,
                info.model, cfg.server.host, port, info.device, info.attention_backend,
                info.num_gpu_blocks)
    return WorkerServer(server, port, worker, health_servicer, cfg.server.grace_seconds)


async def build_server(
    cfg: WorkerConfig, worker: Worker | None = None
) -> tuple[grpc.aio.Server, int, Worker]:
    """``(server, port, worker)``, started; bind port 0 in tests."""
    started = await start_worker_server(cfg, worker)
    return started.server, started.port, started.worker


async def serve(cfg: WorkerConfig) -> None:
    """Runs until SIGTERM/SIGINT, then stops gracefully."""
    started = await start_worker_server(cfg)
    if cfg.server.metrics_port is not None:
        _start_metrics(cfg, started.worker)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    logger.info("worker stopping (grace %.1fs)", cfg.server.grace_seconds)
    await started.stop()


def _start_metrics(cfg: WorkerConfig, worker: Worker) -> None:
    from prometheus_client import REGISTRY

    from pagedserve.metrics_server import start_metrics_server
    from worker.metrics import WorkerMetrics

    worker.metrics = WorkerMetrics(REGISTRY, cfg.server.worker_id, worker.placement.device)
    worker.metrics.set_pools(worker.cache.num_gpu_blocks, worker.cache.num_cpu_blocks)
    assert cfg.server.metrics_port is not None
    port = start_metrics_server(cfg.server.metrics_port, REGISTRY, cfg.server.host)
    logger.info("worker metrics on %s:%d/metrics", cfg.server.host, port)
