"""Builds and runs the scheduler's gRPC server: Scheduler service, health, reflection."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

import grpc

from kvstore import open_store
from pagedserve.core.grpc_util import (
    SERVER_OPTIONS,
    add_health_and_reflection,
    add_port,
    identity_interceptors,
    set_serving,
)
from protos.pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler import discovery
from scheduler.config import SchedulerConfig
from scheduler.engine import Engine
from scheduler.observability import SchedulerObserver
from scheduler.prefix_sync import PrefixSync
from scheduler.servicer import SchedulerServicer
from scheduler.worker_handle import GrpcWorkerHandle, WorkerHandle

logger = logging.getLogger(__name__)

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


class SchedulerServer:
    """A running scheduler: ``port`` is the bound port (config port 0 picks a free one)."""

    def __init__(self, server: grpc.aio.Server, port: int, engine: Engine, health,
                 observer: SchedulerObserver | None = None,
                 servicer: SchedulerServicer | None = None) -> None:
        self.server, self.port, self.engine, self.health = server, port, engine, health
        self.observer, self.servicer = observer, servicer

    @property
    def metrics_port(self) -> int | None:
        """Bound /metrics port, or None when metrics are off."""
        return self.observer.metrics_port if self.observer is not None else None

    async def stop(self, grace: float = 5.0) -> None:
        await set_serving(self.health, [SERVICE_NAME], ok=False)
        if self.servicer is not None:
            self.servicer.drain()  # routers send new requests elsewhere; these get the grace
        await self.server.stop(grace)
        await self.engine.stop()
        if self.engine.prefix_sync is not None:
            await self.engine.prefix_sync.close()  # after the engine: seals the index
        if self.observer is not None:
            await self.observer.stop()


async def build_server(
    config: SchedulerConfig, handles: Sequence[WorkerHandle] | None = None
) -> SchedulerServer:
    """Connects to the workers (``config.worker_addresses`` unless ``handles`` is given), starts
    the engine and binds the server."""
    if handles is None:
        addresses = list(config.worker_addresses)
        if config.worker_discovery:
            host, dport = discovery.parse_discovery(config.worker_discovery)
            addresses += await discovery.wait_for_workers(host, dport, timeout=600)
        handles = [GrpcWorkerHandle(address, tls=config.server.worker_tls)
                   for address in addresses]
    observer = SchedulerObserver(config.log_interval_seconds)
    prefix_sync = PrefixSync(open_store(config.kvstore_url), metrics=observer.metrics)
    engine = Engine(config, handles, observers=[observer], prefix_sync=prefix_sync)
    await engine.start()  # restores each worker's cached blocks from the kvstore
    if config.worker_discovery and handles:
        host, dport = discovery.parse_discovery(config.worker_discovery)
        known = {ws.handle.name for ws in engine.workers}
        worker_tls = config.server.worker_tls
        engine.background_tasks.append(asyncio.create_task(discovery.watch(
            host, dport, known,
            lambda a: engine.add_worker(GrpcWorkerHandle(a, tls=worker_tls)))))
    prefix_sync.start()
    observer.start(engine, config.server.metrics_port, config.server.host)
    tls = config.server.tls
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=identity_interceptors(
        tls, SERVICE_NAME, config.server.client_identities))
    servicer = SchedulerServicer(engine)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    health = add_health_and_reflection(server, [SERVICE_NAME])
    port = add_port(server, f"{config.server.host}:{config.server.port}", tls)
    await server.start()
    await set_serving(health, [SERVICE_NAME], ok=True)
    logger.info("scheduler serving on %s:%d with %d worker(s), %s", config.server.host, port,
                len(handles), "mTLS" if tls.mutual else "TLS" if tls.enabled else "plaintext")
    return SchedulerServer(server, port, engine, health, observer, servicer)


async def serve(config: SchedulerConfig) -> None:
    running = await build_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop(config.server.grace_seconds)
