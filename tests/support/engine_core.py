"""An ``EngineCore`` over a ``ShadowWorker`` and resolved sampling params, as the engine-core unit
tests drive them (no gRPC, no asyncio)."""

from __future__ import annotations

from typing import Any

from pagedserve.core.sampling import make_sampling_params, resolve_sampling_params
from protos.pagedserve.v1 import common_pb2
from scheduler.config import BatchingConfig, CacheConfig, SchedulerConfig
from scheduler.engine_core import EngineCore
from tests.support.shadow_worker import ShadowWorker


def shadow_core(worker: ShadowWorker, budget: int = 64, name: str = "shadow") -> EngineCore:
    """A core for ``worker`` with a ``budget``-token step and recompute preemption."""
    config = SchedulerConfig(batching=BatchingConfig(max_num_batched_tokens=budget),
                             cache=CacheConfig(preemption_mode="recompute"))
    return EngineCore(name, config, worker.info())


def resolved_params(prompt: list[int], **kw: Any) -> common_pb2.SamplingParams:
    """``make_sampling_params(**kw)`` resolved as the router would for ``prompt`` (EOS ignored
    unless asked)."""
    kw.setdefault("ignore_eos", True)
    return resolve_sampling_params(make_sampling_params(**kw), num_prompt_tokens=len(prompt),
                                   max_model_len=4096, max_tokens_limit=4096, eos_token_ids=[0])
