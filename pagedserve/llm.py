"""Offline batch generation on the same engine code as the cluster, all in this process:

    llm = pagedserve.LLM()                      # the packaged SmolLM2, CPU
    outs = llm.generate(["Hello"], pagedserve.make_sampling_params(max_tokens=16, temperature=0))
    print(outs[0].outputs[0].text)

The engine is the scheduler's ``Engine`` driving a ``worker.worker.Worker`` through an
in-process ``WorkerHandle`` (steps pass as ``pagedserve.core.step`` objects, no protobuf); text
goes through the router's tokenizer and ``OutputProcessor``.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from pagedserve.core.models import resolve_model_path
from pagedserve.core.sampling import make_sampling_params, resolve_sampling_params
from protos.pagedserve.v1 import common_pb2
from router.output import OutputProcessor
from router.tokenizer import Tokenizer, load_tokenizer
from scheduler.config import BatchingConfig, CacheConfig, SchedulerConfig
from scheduler.engine import Engine
from scheduler.worker_handle import InProcessWorkerHandle
from worker.config import BatchConfig, LoadConfig, ServerConfig, WorkerConfig
from worker.config import CacheConfig as WorkerCacheConfig
from worker.worker import Worker

Prompt = str | Sequence[int] | Sequence[dict[str, str]]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    cumulative_logprob: float = 0.0
    logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)  # when requested


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0


class LLM:
    """Owns one in-process worker and one engine, on a private event loop."""

    def __init__(
        self,
        model: str | None = None,
        *,
        block_size: int = 16,
        kv_cache_memory_gib: float = 2.0,
        num_gpu_blocks: int | None = None,
        swap_space_gib: float = 1.0,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        enable_prefix_caching: bool = True,
        preemption_mode: str = "swap",
        dtype: str = "auto",
        device: str = "auto",
        attention_backend: str = "auto",
        seed: int | None = None,
    ) -> None:
        path = resolve_model_path(model)
        worker_config = WorkerConfig(
            load=LoadConfig(str(path), dtype, device, attention_backend),
            cache=WorkerCacheConfig(block_size, kv_cache_memory_gib, 0.9, num_gpu_blocks,
                                    swap_space_gib),
            batch=BatchConfig(max_num_batched_tokens, max_num_seqs),
            server=ServerConfig(worker_id="offline-0"),
            seed=seed,
        )
        # The engine below is this worker's only scheduler, in this process: its steps are
        # well-formed by construction, so the worker does not re-check them.
        self.worker = Worker(worker_config, check_steps=False)
        self.tokenizer: Tokenizer = load_tokenizer(path)
        config = SchedulerConfig(
            batching=BatchingConfig(
                max_num_batched_tokens, max_num_seqs, max_waiting_requests=1 << 20
            ),
            cache=CacheConfig(enable_prefix_caching, preemption_mode),
        )
        self.engine = Engine(config, [InProcessWorkerHandle(self.worker, "offline-0")])
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self.engine.start())
        atexit.register(self.close)  # a forgotten close() must not leave step loops dangling
        self._ids = itertools.count()

    def close(self) -> None:
        """Stops the engine; idempotent."""
        atexit.unregister(self.close)
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.engine.stop())
            self._loop.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: common_pb2.SamplingParams | Sequence[common_pb2.SamplingParams] | None = None,
        **sampling: Any,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion, continuously batched. A prompt is text (no chat
        template), token ids, or chat messages (``[{"role": ..., "content": ...}]``)."""
        batch = _as_batch(prompts)
        if params is None:
            params = make_sampling_params(**sampling)
        plist = list(params) if isinstance(params, Sequence) else [params] * len(batch)
        return self._loop.run_until_complete(self._all(list(zip(batch, plist, strict=True))))

    async def _all(
        self, items: list[tuple[Prompt, common_pb2.SamplingParams]]
    ) -> list[RequestOutput]:
        return list(await asyncio.gather(*(self._one(p, q) for p, q in items)))

    async def _one(self, prompt: Prompt, params: common_pb2.SamplingParams) -> RequestOutput:
        ids = self._encode(prompt)
        info = self.engine.model_info
        resolved = resolve_sampling_params(params, num_prompt_tokens=len(ids),
                                           max_model_len=info.max_model_len,
                                           max_tokens_limit=info.max_model_len,
                                           vocab_size=info.vocab_size,
                                           eos_token_ids=info.eos_token_ids)
        request_id = f"offline-{next(self._ids)}"
        processor = OutputProcessor(request_id, self.tokenizer, resolved, len(ids))
        outs = [CompletionOutput(i) for i in range(max(resolved.n, 1))]
        cached = 0
        stream = self.engine.submit(request_id, ids, resolved)
        async for response in stream:
            for seq in response.outputs:
                cached = max(cached, seq.num_cached_tokens)
                outs[seq.index].cumulative_logprob = seq.cumulative_logprob
            for message in processor.process(response):
                out = outs[message.index]
                out.text += message.text
                out.token_ids.extend(message.token_ids)
                out.logprobs.extend(message.logprobs)
                if message.finish_reason:
                    name = common_pb2.FinishReason.Name(message.finish_reason)
                    out.finish_reason = name[14:].lower()
            if processor.all_finished:
                self.engine.abort(request_id)  # a stop string ended it early
                break
        return RequestOutput(request_id, ids, outs, cached)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if _is_chat(prompt):
            return self.tokenizer.encode_chat(cast(Sequence[dict[str, str]], prompt))
        return list(cast(Sequence[int], prompt))


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt becomes a batch of one. The casts record what the runtime checks establish,
    which the ``Prompt`` union cannot express (a list of ids is one prompt, a list of str many)."""
    if isinstance(prompts, str) or _is_ids(prompts) or _is_chat(prompts):
        return [cast(Prompt, prompts)]
    return list(cast(Sequence[Prompt], prompts))


def _is_ids(x: object) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and bool(x) and isinstance(x[0], int)


def _is_chat(x: object) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and bool(x) and isinstance(x[0], dict)
