"""Builds small CPU ``Worker``s for tests (fixed pool size, tiny swap pool, fp32)."""

from __future__ import annotations

from pathlib import Path

from worker.config import CacheConfig, LoadConfig, ServerConfig, WorkerConfig
from worker.worker import Worker


def cpu_worker_config(
    model: str | Path | None,
    block_size: int = 16,
    num_gpu_blocks: int = 64,
    swap_space_gib: float = 0.0005,
    seed: int | None = 0,
) -> WorkerConfig:
    return WorkerConfig(
        load=LoadConfig(model=None if model is None else str(model), dtype="float32",
                        device="cpu", attention_backend="torch"),
        cache=CacheConfig(block_size=block_size, num_gpu_blocks=num_gpu_blocks,
                          swap_space_gib=swap_space_gib),
        server=ServerConfig(worker_id="test-worker"),
        seed=seed,
    )


def cpu_worker(model: str | Path | None, **kwargs: object) -> Worker:
    return Worker(cpu_worker_config(model, **kwargs))  # type: ignore[arg-type]
