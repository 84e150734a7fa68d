"""Scheduler configuration: one frozen dataclass built from small sub-configs (CLI > env >
defaults)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace

from pagedserve.core.grpc_util import (
    TlsConfig,
    add_client_identity_argument,
    add_tls_arguments,
    client_identities_from_args,
    tls_config_from_args,
)

ROUTER_IDENTITY = "pagedserve-router"


@dataclass(frozen=True)
class BatchingConfig:
    max_num_batched_tokens: int = 2048  # per-step token budget (prefill chunks + decodes)
    max_num_seqs: int = 256  # running sequences per worker
    max_waiting_requests: int = 1024  # beyond this, Submit is refused with RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError("--max-num-batched-tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("--max-num-seqs must be >= 1")
        if self.max_waiting_requests < 1:
            raise ValueError("--max-waiting-requests must be >= 1")


@dataclass(frozen=True)
class CacheConfig:
    enable_prefix_caching: bool = True
    preemption_mode: str = "swap"  # swap | recompute; swap measured faster (bench preemption)
    watermark: float = 0.01  # fraction of blocks kept free at admission, against thrashing

    def __post_init__(self) -> None:
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError("--preemption-mode must be 'recompute' or 'swap'")
        if not 0.0 <= self.watermark < 0.5:
            raise ValueError("--watermark must be in [0, 0.5)")


@dataclass(frozen=True)
class ServerConfig:
    """``tls`` is the scheduler's certificate, on its port and towards the workers (which admit
    only it). With its CA set, only a client certificate naming one of ``client_identities``
    (the router's) may call the Scheduler service. ``worker_tls_server_name``: the name the
    workers' certificate carries when their addresses (pod IPs from discovery) are not in it."""

    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None
    grace_seconds: float = 5.0
    tls: TlsConfig = field(default_factory=TlsConfig)
    client_identities: tuple[str, ...] = (ROUTER_IDENTITY,)
    worker_tls_server_name: str | None = None

    def __post_init__(self) -> None:
        self.tls.check_server()

    @property
    def worker_tls(self) -> TlsConfig:
        """How this scheduler calls its workers."""
        return replace(self.tls, server_name=self.worker_tls_server_name)


@dataclass(frozen=True)
class SchedulerConfig:
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    worker_addresses: tuple[str, ...] = ()
    worker_discovery: str | None = None  # k8s-headless=NAME:PORT (scheduler/discovery.py)
    kvstore_url: str = "memory://"
    log_interval_seconds: float = 10.0  # periodic INFO stats line; 0 = off

    def __post_init__(self) -> None:
        if self.log_interval_seconds < 0:
            raise ValueError("--log-interval-seconds must be >= 0 (0 turns the stats line off)")
        if not (self.kvstore_url.startswith("memory://") or self.kvstore_url.startswith("redis://")):
            raise ValueError("--kvstore must be memory:// or redis://HOST:PORT/DB")


def add_scheduler_arguments(parser: argparse.ArgumentParser, with_server: bool = True) -> None:
    env = os.environ.get
    g = parser.add_argument_group("scheduler")
    g.add_argument("--max-num-batched-tokens", type=int,
                   default=int(env("PAGEDSERVE_MAX_NUM_BATCHED_TOKENS", "2048")))
    g.add_argument("--max-num-seqs", type=int, default=int(env("PAGEDSERVE_MAX_NUM_SEQS", "256")))
    g.add_argument("--max-waiting-requests", type=int,
                   default=int(env("PAGEDSERVE_MAX_WAITING_REQUESTS", "1024")))
    g.add_argument("--no-prefix-caching", action="store_true",
                   default=env("PAGEDSERVE_NO_PREFIX_CACHING", "") == "1")
    g.add_argument("--preemption-mode", choices=["recompute", "swap"],
                   default=env("PAGEDSERVE_PREEMPTION_MODE", "swap"))
    g.add_argument("--watermark", type=float, default=float(env("PAGEDSERVE_WATERMARK", "0.01")))
    g.add_argument("--kvstore", default=env("PAGEDSERVE_KVSTORE", "memory://"),
                   help="prefix index: memory:// (embedded) or redis://HOST:PORT/DB")
    g.add_argument("--log-interval-seconds", type=float,
                   default=float(env("PAGEDSERVE_LOG_INTERVAL_SECONDS", "10")),
                   help="seconds between INFO stats lines (0 = off)")
    if with_server:
        g.add_argument("--worker", action="append", default=[], dest="workers",
                       help="worker address HOST:PORT (repeat for several)")
        g.add_argument("--worker-discovery", default=env("PAGEDSERVE_WORKER_DISCOVERY"),
                       help="k8s-headless=NAME:PORT: workers are the addresses NAME resolves to")
        g.add_argument("--host", default=env("PAGEDSERVE_HOST", "127.0.0.1"))
        g.add_argument("--port", type=int, default=int(env("PAGEDSERVE_SCHEDULER_PORT", "50052")))
        g.add_argument("--metrics-port", type=int,
                       default=_optional_int(env("PAGEDSERVE_SCHEDULER_METRICS_PORT")),
                       help="serve Prometheus /metrics on this port (unset = off, 0 = any)")
        add_tls_arguments(g, "PAGEDSERVE_SCHEDULER_")
        add_client_identity_argument(g, "PAGEDSERVE_SCHEDULER_", ROUTER_IDENTITY,
                                     "the Scheduler service")
        g.add_argument("--worker-tls-server-name",
                       default=env("PAGEDSERVE_SCHEDULER_WORKER_TLS_SERVER_NAME") or None,
                       help="name the workers' certificate carries, when their addresses are "
                            "not in it (workers found by discovery)")


def scheduler_config_from_args(args: argparse.Namespace) -> SchedulerConfig:
    return SchedulerConfig(
        batching=BatchingConfig(args.max_num_batched_tokens, args.max_num_seqs,
                                args.max_waiting_requests),
        cache=CacheConfig(not args.no_prefix_caching, args.preemption_mode, args.watermark),
        server=_server_config(args),
        worker_addresses=tuple(getattr(args, "workers", ()) or ()),
        worker_discovery=getattr(args, "worker_discovery", None),
        kvstore_url=args.kvstore,
        log_interval_seconds=getattr(args, "log_interval_seconds", 10.0),
    )


def _server_config(args: argparse.Namespace) -> ServerConfig:
    if not hasattr(args, "host"):  # an embedded engine (with_server=False): no server
        return ServerConfig()
    return ServerConfig(args.host, args.port, args.metrics_port, tls=tls_config_from_args(args),
                        client_identities=client_identities_from_args(args),
                        worker_tls_server_name=args.worker_tls_server_name)


def _optional_int(value: str | None) -> int | None:
    return int(value) if value else None
