"""A whole cluster on one machine.

``start_local_cluster`` runs router, scheduler and workers as real gRPC servers on loopback ports
inside the current event loop (tests, benchmarks). ``pagedserve up`` (``pagedserve/up.py``) runs
the same servers as separate processes.

Why two launchers: this one is for code that needs the servers' objects in hand (a test asserting
on the engine's block pool, a benchmark sharing one loaded model between runs) and starts in a
second with nothing to clean up after; ``up`` is for people: a process per service, as deployed,
supervised and restarted, with progress on stderr. Both build the servers with the same
``start_*``/``build_server`` functions, so the services themselves have one way to start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from pagedserve.core.grpc_util import TlsConfig
from pagedserve.core.models import resolve_model_path
from router.config import RouterConfig
from router.config import ServerConfig as RouterServerConfig
from router.server import RouterServer, start_router
from router.tokenizer import load_tokenizer
from scheduler.config import SchedulerConfig
from scheduler.config import ServerConfig as SchedulerServerConfig
from scheduler.server import SchedulerServer
from scheduler.server import build_server as build_scheduler
from scheduler.worker_handle import GrpcWorkerHandle
from worker.config import WorkerConfig
from worker.server import WorkerServer, start_worker_server
from worker.worker import Worker


@dataclass
class LocalCluster:
    workers: list[WorkerServer]
    scheduler: SchedulerServer
    router: RouterServer
    model_path: Path
    extra: list = field(default_factory=list)

    @property
    def router_address(self) -> str:
        return f"127.0.0.1:{self.router.port}"

    @property
    def scheduler_address(self) -> str:
        return f"127.0.0.1:{self.scheduler.port}"

    @property
    def http_url(self) -> str | None:
        """``http(s)://127.0.0.1:PORT`` of the router's OpenAI-compatible API (``http=True``)."""
        return None if self.router.http is None else self.router.http.url

    @property
    def engine(self):
        return self.scheduler.engine

    @property
    def metrics_urls(self) -> dict[str, str]:
        """``{"router": url, "scheduler": url, "worker-0": url, ...}`` for the services started
        with metrics (``start_local_cluster(..., metrics=True)``)."""
        ports = {"router": self.router.metrics_port, "scheduler": self.scheduler.metrics_port}
        ports.update({f"worker-{i}": w.metrics_port for i, w in enumerate(self.workers)})
        return {name: f"http://127.0.0.1:{port}/metrics"
                for name, port in ports.items() if port is not None}

    async def stop(self) -> None:
        await self.router.stop()
        await self.scheduler.stop(grace=1.0)
        for w in self.workers:
            await w.stop()


async def start_local_cluster(
    worker_configs: list[WorkerConfig],
    scheduler_config: SchedulerConfig | None = None,
    workers: list[Worker] | None = None,
    router_config: RouterConfig | None = None,
    metrics: bool = False,
    http: bool = False,
    tls: Mapping[str, TlsConfig] | None = None,
) -> LocalCluster:
    """Starts workers, then the scheduler (connected to them over gRPC), then the router.
    Pre-built ``workers`` (e.g. shared across tests) skip model loading. ``metrics`` serves
    every service's /metrics on a free port (``LocalCluster.metrics_urls``); ``http`` serves the
    router's OpenAI-compatible API on a free port (``LocalCluster.http_url``). ``tls`` maps
    "router", "scheduler" and "worker" to their certificates
    (``pagedserve.certs.write_local_pki``): every connection is then (m)TLS."""
    metrics_port = 0 if metrics else None
    tls = tls or {}
    worker_configs = [replace(c, server=replace(
        c.server, metrics_port=0 if metrics else c.server.metrics_port,
        tls=tls.get("worker", c.server.tls))) for c in worker_configs]
    started = await asyncio.gather(*(
        start_worker_server(cfg, workers[i] if workers else None)
        for i, cfg in enumerate(worker_configs)))
    sconf = scheduler_config or SchedulerConfig()
    sconf = SchedulerConfig(
        batching=sconf.batching, cache=sconf.cache,
        server=SchedulerServerConfig(host="127.0.0.1", port=0, metrics_port=metrics_port,
                                     tls=tls.get("scheduler", TlsConfig())),
        worker_addresses=tuple(f"127.0.0.1:{w.port}" for w in started),
        kvstore_url=sconf.kvstore_url, log_interval_seconds=sconf.log_interval_seconds,
    )
    scheduler = await build_scheduler(sconf, [GrpcWorkerHandle(a, tls=sconf.server.worker_tls)
                                              for a in sconf.worker_addresses])
    model_path = resolve_model_path(worker_configs[0].load.model)
    rconf = router_config or RouterConfig()
    rconf = replace(
        rconf, model=str(model_path), scheduler_address=f"127.0.0.1:{scheduler.port}",
        server=RouterServerConfig(host="127.0.0.1", port=0, grace_s=1.0,
                                  metrics_port=metrics_port, http_port=0 if http else None,
                                  tls=tls.get("router", TlsConfig())),
        max_tokens_limit=rconf.max_tokens_limit, request_timeout_s=rconf.request_timeout_s,
        max_prompt_bytes=rconf.max_prompt_bytes, max_prompt_tokens=rconf.max_prompt_tokens,
    )
    tokenizer = await asyncio.to_thread(load_tokenizer, model_path)
    router = await start_router(rconf, tokenizer)
    return LocalCluster(list(started), scheduler, router, model_path)
