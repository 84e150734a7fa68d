"""``WorkerConfig``: one frozen dataclass from small sub-configs, built once (CLI > env > defaults).

Values discovered at run time (the number of KV blocks, the resolved device) are never written
back here; they live in the ``Worker`` and travel in ``WorkerInfo``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

from pagedserve.core.grpc_util import (
    TlsConfig,
    add_client_identity_argument,
    add_tls_arguments,
    client_identities_from_args,
    tls_config_from_args,
)

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "torch", "triton")
ENV_PREFIX = "PAGEDSERVE_WORKER_"


@dataclass(frozen=True)
class LoadConfig:
    """``model``: None/"default" = the packaged SmolLM2 GGUF. ``dtype`` "auto": float32 on CPU,
    bfloat16 on CUDA."""

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        _choice("dtype", self.dtype, DTYPES)
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r}: use one of {DEVICES} or cuda:N")
        _choice("attention_backend", self.attention_backend, BACKENDS)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory_gib: float = 2.0  # CPU device budget
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks: int | None = None  # override (tests)
    swap_space_gib: float = 1.0

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size {self.block_size}: use a power of two, e.g. 16")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError("kv_cache_memory_gib must be > 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1], e.g. 0.9")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks <= 0:
            raise ValueError("num_gpu_blocks must be > 0 (or unset to size by memory)")
        if self.swap_space_gib < 0:
            raise ValueError("swap_space_gib must be >= 0")


@dataclass(frozen=True)
class BatchConfig:
    """The largest step this worker is started for. On CUDA the KV pool is sized by profiling a
    dummy step of this size. The scheduler plans the steps (its ``--max-num-batched-tokens`` and
    ``--max-num-seqs``); the worker reports these values in ``WorkerInfo`` and the scheduler
    refuses to start with a budget above them."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens <= 0 or self.max_num_seqs <= 0:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be > 0")


SCHEDULER_IDENTITY = "pagedserve-scheduler"


@dataclass(frozen=True)
class ServerConfig:
    """``tls``: this worker's certificate; with its CA set, only a client certificate naming
    one of ``client_identities`` (the scheduler's) may call the Worker service: no other
    caller can step it, read or overwrite its blocks."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    metrics_port: int | None = None
    worker_id: str = "worker-0"
    grace_seconds: float = 5.0
    tls: TlsConfig = field(default_factory=TlsConfig)
    client_identities: tuple[str, ...] = (SCHEDULER_IDENTITY,)

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} {value}: use 0..65535")
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        self.tls.check_server()


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism: this process is rank ``rank`` of a group of ``size`` worker processes
    that the scheduler sees as one worker (``worker/parallel.py``). Rank 0, the leader, serves
    the Worker service; the others follow it. ``master`` (``host:port``) is where the group's
    ranks meet (the torch.distributed TCP store, hosted by rank 0); ``timeout_s`` bounds every
    collective, so a dead or hung rank fails the group instead of hanging it;
    ``rendezvous_timeout_s`` bounds the wait for every rank to join, much longer: the ranks of a
    restarted group may come back minutes apart (a kubelet's restart backoff)."""

    size: int = 1
    rank: int = 0
    master: str | None = None
    timeout_s: float = 30.0
    rendezvous_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"tensor_parallel_size {self.size}: use 1 or more")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor_parallel_rank {self.rank}: use 0..{self.size - 1}")
        if self.size > 1 and not self.master:
            raise ValueError("tensor_parallel_size > 1 needs --tensor-parallel-master HOST:PORT")
        if self.master and not _is_host_port(self.master):
            raise ValueError(f"tensor_parallel_master {self.master!r}: use HOST:PORT")
        if self.timeout_s <= 0:
            raise ValueError("tensor_parallel_timeout_s must be > 0")
        if self.rendezvous_timeout_s <= 0:
            raise ValueError("tensor_parallel_rendezvous_timeout_s must be > 0")

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class WorkerConfig:
    load: LoadConfig = field(default_factory=LoadConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int | None = None  # seeds unseeded sampling (tests); None = nondeterministic

    def __post_init__(self) -> None:
        if self.load.device == "cpu" and self.load.attention_backend == "triton":
            raise ValueError("attention_backend triton needs a CUDA device: use torch or auto")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r}: use one of {choices}")


def _is_host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) <= 65535


# ------------------------------------------------------------------------------------------ CLI

_ARGS: list[tuple[str, type, Any, str]] = [
    ("model", str, None, "HF safetensors directory or .gguf file (default: packaged SmolLM2)"),
    ("dtype", str, "auto", "auto|float32|float16|bfloat16"),
    ("device", str, "auto", "auto|cpu|cuda|cuda:N"),
    ("attention_backend", str, "auto", "auto|torch|triton"),
    ("block_size", int, 16, "tokens per KV block"),
    ("kv_cache_memory_gib", float, 2.0, "KV pool budget on CPU"),
    ("gpu_memory_utilization", float, 0.9, "fraction of GPU memory the worker may use"),
    ("num_gpu_blocks", int, None, "fixed KV pool size (overrides sizing)"),
    ("swap_space_gib", float, 1.0, "host swap pool size"),
    ("max_num_batched_tokens", int, 2048,
     "largest step in tokens (profiled at start; the scheduler's must not exceed it)"),
    ("max_num_seqs", int, 256, "largest step in sequences (the scheduler's must not exceed it)"),
    ("seed", int, None, "seed for unseeded sampling"),
    ("worker_id", str, "worker-0", "id reported to the scheduler"),
    ("host", str, "127.0.0.1", "bind address"),
    ("port", int, 0, "gRPC port (0 = any free)"),
    ("metrics_port", int, None, "Prometheus metrics port (unset = off)"),
    ("tensor_parallel_size", int, 1, "worker processes in this tensor-parallel group"),
    ("tensor_parallel_rank", int, 0,
     "this process's rank in its group (0 = leader: serves the Worker service)"),
    ("tensor_parallel_master", str, None,
     "HOST:PORT where the group's ranks meet (rank 0 listens; required when size > 1)"),
    ("tensor_parallel_timeout_s", float, 30.0,
     "seconds a collective may wait for a rank before the group fails"),
    ("tensor_parallel_rendezvous_timeout_s", float, 600.0,
     "seconds a rank waits at start for the others to join"),
]


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--model`` ... ``--tensor-parallel-timeout-s``; each also reads
    ``PAGEDSERVE_WORKER_<NAME>``."""
    group = parser.add_argument_group("worker")
    for name, kind, default, help_text in _ARGS:
        env = os.environ.get(ENV_PREFIX + name.upper())
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            default=kind(env) if env not in (None, "") else default,
            help=f"{help_text} [env {ENV_PREFIX}{name.upper()}]",
        )
    add_tls_arguments(group, ENV_PREFIX)
    add_client_identity_argument(group, ENV_PREFIX, SCHEDULER_IDENTITY, "the Worker service")


def worker_config_from_args(args: argparse.Namespace) -> WorkerConfig:
    a = vars(args)
    return WorkerConfig(
        load=LoadConfig(a["model"], a["dtype"], a["device"], a["attention_backend"]),
        cache=CacheConfig(
            a["block_size"], a["kv_cache_memory_gib"], a["gpu_memory_utilization"],
            a["num_gpu_blocks"], a["swap_space_gib"],
        ),
        batch=BatchConfig(a["max_num_batched_tokens"], a["max_num_seqs"]),
        server=ServerConfig(a["host"], a["port"], a["metrics_port"], a["worker_id"],
                            tls=tls_config_from_args(args),
                            client_identities=client_identities_from_args(args)),
        parallel=ParallelConfig(a["tensor_parallel_size"], a["tensor_parallel_rank"],
                                a["tensor_parallel_master"], a["tensor_parallel_timeout_s"],
                                a["tensor_parallel_rendezvous_timeout_s"]),
        seed=a["seed"],
    )
