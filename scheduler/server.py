"""Builds and runs the scheduler's gRPC server: Scheduler service, health, reflection."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

import grpc

from pagedserve.grpc_util import CHANNEL_OPTIONS, add_health_and_reflection, set_serving
from protos.pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler.config import SchedulerConfig
from scheduler.engine import Engine
from scheduler.servicer import SchedulerServicer
from scheduler.worker_handle import GrpcWorkerHandle, WorkerHandle

logger = logging.getLogger(__name__)

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


class SchedulerServer:
    """A running scheduler: ``port`` is the bound port (config port 0 picks a free one)."""

    def __init__(self, server: grpc.aio.Server, port: int, engine: Engine, health) -> None:
        self.server, self.port, self.engine, self.health = server, port, engine, health

    async def stop(self, grace: float = 5.0) -> None:
        await set_serving(self.health, [SERVICE_NAME], ok=False)
        await self.server.stop(grace)
        await self.engine.stop()


async def build_server(
    config: SchedulerConfig, handles: Sequence[WorkerHandle] | None = None
) -> SchedulerServer:
    """Connects to the workers (``config.worker_addresses`` unless ``handles`` is given), starts
    the engine and binds the server."""
    if handles is None:
        handles = [GrpcWorkerHandle(address) for address in config.worker_addresses]
    engine = Engine(config, handles)
    await engine.start()
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(engine), server)
    health = add_health_and_reflection(server, [SERVICE_NAME])
    port = server.add_insecure_port(f"{config.server.host}:{config.server.port}")
    await server.start()
    await set_serving(health, [SERVICE_NAME], ok=True)
    logger.info("scheduler serving on %s:%d with %d worker(s)", config.server.host, port,
                len(handles))
    return SchedulerServer(server, port, engine, health)


async def serve(config: SchedulerConfig) -> None:
    running = await build_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop(config.server.grace_seconds)
