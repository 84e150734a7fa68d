"""Builds and runs the router: the gRPC server (Generation, health, reflection) and, when
``--http-port`` is set, the OpenAI-compatible HTTP API beside it on the same event loop, both over
one ``GenerationService`` and the router's single scheduler connection; graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health

from pagedserve.core.grpc_util import (
    add_health_and_reflection,
    add_port,
    add_servicer_parsing_requests,
    server_options,
    set_serving,
)
from pagedserve.core.metrics_server import MetricsServer, new_registry, serve_metrics
from pagedserve.core.models import resolve_model_path
from protos.pagedserve.v1 import generation_pb2, scheduler_pb2
from router.auth import ApiKeys
from router.config import RouterConfig
from router.generation import GenerationService
from router.http_server import HttpServer, start_http_server
from router.metrics import RouterMetrics
from router.request import ServedModel
from router.scheduler_client import SchedulerClient
from router.servicer import GenerationServicer
from router.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass
class RouterServer:
    """A started router: the grpc server plus what ``stop`` must release."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    scheduler: SchedulerClient
    grace_s: float
    metrics: RouterMetrics | None = None
    metrics_server: MetricsServer | None = None
    http: HttpServer | None = None

    @property
    def metrics_port(self) -> int | None:
        """Bound /metrics port, or None when metrics are off."""
        return self.metrics_server.port if self.metrics_server is not None else None

    @property
    def http_port(self) -> int | None:
        """Bound HTTP API port, or None when the HTTP API is off."""
        return self.http.port if self.http is not None else None

    async def stop(self) -> None:
        """Health (gRPC and ``/health``) goes NOT_SERVING first so load balancers drain, then
        in-flight calls of both protocols get ``grace_s`` to finish before they are cancelled."""
        await set_serving(self.health, [SERVICE_NAME], False)
        if self.http is not None:
            self.http.set_serving(False)
        stops = [self.server.stop(self.grace_s)]
        if self.http is not None:
            stops.append(self.http.stop())
        await asyncio.gather(*stops)
        await self.scheduler.close()
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)


def served_model(info: scheduler_pb2.SchedulerModelInfo, name: str | None) -> ServedModel:
    return ServedModel(
        name=name or info.model, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
        block_size=info.block_size, eos_token_ids=tuple(info.eos_token_ids),
        max_num_tokens_per_request=info.max_num_tokens_per_request,
    )


async def start_router(cfg: RouterConfig, tokenizer: Tokenizer | None = None) -> RouterServer:
    """Loads the tokenizer (unless given), asks the scheduler what it serves, starts serving."""
    if tokenizer is None:
        tokenizer = await asyncio.to_thread(load_tokenizer, resolve_model_path(cfg.model))
    api_keys = ApiKeys.load(cfg.api_key_file, cfg.api_keys)  # a bad key file fails first
    tls = cfg.server.tls
    scheduler = SchedulerClient(cfg.scheduler_address, tls)
    info = await scheduler.model_info(cfg.startup_timeout_s)
    model = served_model(info, cfg.served_model_name)
    registry = new_registry()
    metrics = RouterMetrics(registry, model.name)
    service = GenerationService(tokenizer, scheduler, model,
                                max_tokens_limit=cfg.max_tokens_limit,
                                request_timeout_s=cfg.request_timeout_s, metrics=metrics,
                                api_keys=api_keys, rate_limits=cfg.rate_limits,
                                max_prompt_bytes=cfg.max_prompt_bytes,
                                max_prompt_tokens=cfg.max_prompt_tokens,
                                cache_isolation=cfg.prefix_cache_isolation)
    # The public port refuses (RESOURCE_EXHAUSTED) a message too large for any acceptable
    # prompt before parsing it.
    server = grpc.aio.server(
        options=server_options(max_receive_bytes=service.prompt_limits.max_request_bytes))
    add_servicer_parsing_requests(server, GenerationServicer(service),
                                  generation_pb2.DESCRIPTOR.services_by_name["Generation"])
    health_servicer = add_health_and_reflection(server, [SERVICE_NAME])
    port = add_port(server, f"{cfg.server.host}:{cfg.server.port}", tls)
    http = None
    if cfg.server.http_port is not None:  # bound before gRPC says SERVING: both are up then
        http = await start_http_server(service, cfg.server.host, cfg.server.http_port,
                                       cfg.server.grace_s, tls)
    await server.start()
    await set_serving(health_servicer, [SERVICE_NAME], True)
    if http is not None:
        http.set_serving(True)
    logger.info("router serving %s on port %d%s (scheduler %s, context %d, %s, %s)",
                model.name, port, f", HTTP {http.url}" if http is not None else "",
                cfg.scheduler_address, model.context_len,
                "mTLS" if tls.mutual else "TLS" if tls.enabled else "plaintext",
                f"API keys {', '.join(api_keys.key_ids)}" if api_keys.enabled else "no API keys")
    metrics_server = None
    if cfg.server.metrics_port is not None:
        metrics_server = serve_metrics(cfg.server.metrics_port, registry, cfg.server.host)
        logger.info("router metrics on %s", metrics_server.url)
    return RouterServer(server, port, health_servicer, scheduler, cfg.server.grace_s, metrics,
                        metrics_server, http)


async def build_server(
    cfg: RouterConfig, tokenizer: Tokenizer | None = None
) -> tuple[grpc.aio.Server, int]:
    """``(server, port)``, started; bind port 0 in tests. Use ``start_router`` to also get
    graceful ``stop``."""
    router = await start_router(cfg, tokenizer)
    return router.server, router.port


async def serve(cfg: RouterConfig) -> None:
    """Runs until SIGTERM/SIGINT, then stops gracefully."""
    router = await start_router(cfg)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    logger.info("router stopping (grace %.1fs)", cfg.server.grace_s)
    await router.stop()
