"""Placement across workers whose KV pools differ in size.

A request goes only to a worker whose *whole* pool can hold it (prompt + max_tokens, times its
samples as the engine accounts them); the limit the scheduler advertises is the largest pool; a
request no worker could ever hold is refused at once with RESOURCE_EXHAUSTED. Before this was
checked, a request that only the large worker can hold could land on the small one (both had room
for its prompt, the tie went to the first) and never finish: it preempted itself forever.
"""

from __future__ import annotations

import asyncio

import pytest

from pagedserve.core.errors import ResourceExhausted, Unavailable
from pagedserve.core.sampling import make_sampling_params, resolve_sampling_params
from protos.pagedserve.v1 import common_pb2
from scheduler.config import SchedulerConfig
from scheduler.engine import Engine
from scheduler.worker_handle import InProcessWorkerHandle
from tests.support.shadow_worker import ShadowWorker, reference_output

BS = 4  # ShadowWorker's block size
SMALL, LARGE = 12, 256  # blocks: 48 and 1024 tokens
TIMEOUT_S = 10.0  # generous: each request below takes well under a second


def _params(max_tokens: int, prompt_len: int, **kw: object) -> common_pb2.SamplingParams:
    p = make_sampling_params(max_tokens=max_tokens, ignore_eos=True, **kw)
    return resolve_sampling_params(p, num_prompt_tokens=prompt_len, max_model_len=4096,
                                   max_tokens_limit=4096)


def _engine(*pools: int) -> tuple[Engine, list[ShadowWorker]]:
    """Small pool first: before the fix, ties in placement went to the first worker."""
    workers = [ShadowWorker(num_gpu_blocks=n, num_cpu_blocks=8, name=f"w{n}") for n in pools]
    handles = [InProcessWorkerHandle(w, w.name) for w in workers]
    return Engine(SchedulerConfig(), handles), workers


async def _collect(engine: Engine, rid: str, prompt: list[int],
                   params: common_pb2.SamplingParams) -> dict[int, list[int]]:
    outs: dict[int, list[int]] = {}

    async def run() -> None:
        async for resp in engine.submit(rid, prompt, params):
            for o in resp.outputs:
                outs.setdefault(o.index, []).extend(o.token_ids)

    await asyncio.wait_for(run(), TIMEOUT_S)  # the bug: never finishes
    return outs


def test_a_request_only_the_larger_pool_can_hold_runs_there_and_finishes() -> None:
    async def main() -> None:
        engine, _ = _engine(SMALL, LARGE)
        await engine.start()
        try:
            prompt = list(range(1, 21))  # 5 blocks: the small pool has room for the prompt...
            params = _params(60, len(prompt))  # ... but not for 80 tokens (20 blocks)
            stream_outs = await _collect(engine, "big", prompt, params)
            assert stream_outs[0] == reference_output(prompt, 60, None)
            placed = [ws.handle.name for ws in engine.workers if ws.num_steps]
            assert placed == [f"w{LARGE}"]
        finally:
            await engine.stop()

    asyncio.run(main())


def test_parallel_samples_count_towards_what_a_pool_must_hold() -> None:
    async def main() -> None:
        engine, _ = _engine(SMALL, LARGE)
        await engine.start()
        try:
            prompt = list(range(1, 9))
            # One sample of 8 + 20 tokens fits 12 blocks; four samples of 20 tokens do not.
            params = _params(20, len(prompt), n=4, temperature=1.0, seed=5)
            outs = await _collect(engine, "n4", prompt, params)
            for i in range(4):
                assert outs[i] == reference_output(prompt, 20, 5 + i)
            assert engine.workers[0].num_steps == 0  # the small worker never ran it
        finally:
            await engine.stop()

    asyncio.run(main())


def test_small_requests_still_use_every_worker() -> None:
    async def main() -> None:
        engine, _ = _engine(SMALL, LARGE)
        await engine.start()
        try:
            prompt = [3, 4, 5]
            streams = [engine.submit(f"s{i}", prompt, _params(4, len(prompt)))
                       for i in range(4)]
            assert {engine.requests[f"s{i}"].worker.handle.name for i in range(4)} == {
                f"w{SMALL}", f"w{LARGE}"}
            for stream in streams:
                async for _ in stream:
                    pass
        finally:
            await engine.stop()

    asyncio.run(main())


def test_the_limit_advertised_is_the_largest_pool_and_beyond_it_is_refused_at_once() -> None:
    async def main() -> None:
        engine, _ = _engine(SMALL, LARGE)
        await engine.start()
        try:
            assert engine.model_info.max_num_tokens_per_request == LARGE * BS
            prompt = list(range(1, 41))
            with pytest.raises(ResourceExhausted, match="KV blocks"):
                engine.submit("huge", prompt, _params(LARGE * BS, len(prompt)))
            with pytest.raises(ResourceExhausted, match="KV blocks"):  # samples count too
                engine.submit("wide", prompt, _params(400, len(prompt), n=4, temperature=1.0))
            assert not engine.requests and engine.stats().num_waiting == 0
        finally:
            await engine.stop()

    asyncio.run(main())


def test_a_request_moved_off_a_failed_worker_goes_only_where_it_fits() -> None:
    """The large worker fails mid-request; the small one cannot hold the request, so it ends
    UNAVAILABLE instead of running forever on the small one."""
    async def main() -> None:
        engine, workers = _engine(SMALL, LARGE)
        await engine.start()
        try:
            prompt = list(range(1, 21))
            stream = engine.submit("big", prompt, _params(200, len(prompt)))
            assert engine.requests["big"].worker.handle.name == f"w{LARGE}"
            workers[1].fail_next_step = True

            async def drain() -> None:
                async for _ in stream:
                    pass

            with pytest.raises(Unavailable, match="no healthy worker"):
                await asyncio.wait_for(drain(), TIMEOUT_S)
            assert workers[0].num_steps == 0
        finally:
            await engine.stop()

    asyncio.run(main())


def test_blocks_needed_is_what_the_engine_accounts() -> None:
    from scheduler.placement import blocks_needed

    # Prompt blocks (shared), then per sample its output blocks plus one (its copy of the
    # partial prompt block, or a beam's fork).
    assert blocks_needed(20, 60, 1, BS) == 5 + (15 + 1)
    assert blocks_needed(8, 20, 4, BS) == 2 + 4 * (5 + 1)
    assert blocks_needed(1, 1, 1, 16) == 1 + 2
