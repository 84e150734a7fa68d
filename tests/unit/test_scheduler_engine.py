"""The scheduler engine against a content-checking worker double (tests/support/shadow_worker.py):
deltas, prefix caching, copy-on-write, parallel sampling, preemption and abort, with no model."""

from __future__ import annotations

import asyncio
import random

import pytest

from pagedserve.core.errors import Aborted
from pagedserve.core.sampling import make_sampling_params, resolve_sampling_params
from scheduler.config import BatchingConfig, CacheConfig, SchedulerConfig
from scheduler.engine import Engine
from scheduler.worker_handle import InProcessWorkerHandle
from tests.support.shadow_worker import ShadowWorker, reference_output


def _params(max_tokens: int, prompt_len: int, **kw):
    p = make_sampling_params(max_tokens=max_tokens, ignore_eos=True, **kw)
    return resolve_sampling_params(p, num_prompt_tokens=prompt_len, max_model_len=4096,
                                   max_tokens_limit=4096)


async def _run(engine: Engine, requests: dict[str, tuple[list[int], object]]):
    async def collect(rid, prompt, params):
        outs: dict[int, list[int]] = {}
        async for resp in engine.submit(rid, prompt, params):
            for o in resp.outputs:
                outs.setdefault(o.index, []).extend(o.token_ids)
        return rid, outs
    results = await asyncio.gather(*(collect(r, p, pa) for r, (p, pa) in requests.items()))
    return dict(results)


def _engine(worker: ShadowWorker, **cfg) -> Engine:
    cache = CacheConfig(**{k: v for k, v in cfg.items() if k in ("preemption_mode",
                                                                   "enable_prefix_caching")})
    batching = BatchingConfig(**{k: v for k, v in cfg.items() if k.startswith("max_")})
    return Engine(SchedulerConfig(batching=batching, cache=cache), [InProcessWorkerHandle(worker)])


def _mixed_requests(num: int, seed: int = 0):
    rng = random.Random(seed)
    reqs = {}
    for i in range(num):
        prompt = [rng.randrange(1, 100) for _ in range(rng.randint(1, 40))]
        reqs[f"r{i}"] = (prompt, _params(rng.randint(1, 30), len(prompt)))
    return reqs


async def _eventually(check, what: str, timeout_s: float = 10.0) -> None:
    """Polls ``check`` while the engine's step loop finishes background work (e.g. the drop of
    finished sequences reaching the worker), instead of sleeping a guessed time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _free_everything(engine: Engine) -> bool:
    kv = engine.workers[0].kv
    return (kv.gpu.num_free_blocks == kv.gpu.num_blocks
            and kv.cpu.num_free_blocks == kv.cpu.num_blocks)


def test_outputs_equal_the_reference_and_every_block_is_freed():
    async def main():
        worker = ShadowWorker(num_gpu_blocks=256)
        engine = _engine(worker, max_num_batched_tokens=64)
        await engine.start()
        reqs = _mixed_requests(20)
        results = await _run(engine, reqs)
        for rid, (prompt, params) in reqs.items():
            assert results[rid][0] == reference_output(prompt, params.max_tokens, None)
        await _eventually(lambda: _free_everything(engine) and worker.seqs == {},
                          "the drop of finished sequences to reach the worker")
        await engine.stop()
    asyncio.run(main())


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_under_a_tiny_pool_gives_identical_outputs(mode):
    async def main():
        worker = ShadowWorker(num_gpu_blocks=24, num_cpu_blocks=64)
        engine = _engine(worker, max_num_batched_tokens=32, preemption_mode=mode)
        await engine.start()
        reqs = _mixed_requests(16, seed=1)
        results = await _run(engine, reqs)
        for rid, (prompt, params) in reqs.items():
            assert results[rid][0] == reference_output(prompt, params.max_tokens, None), rid
        preemptions = engine.workers[0].sched.num_preemptions
        assert preemptions[mode] > 0, preemptions
        await _eventually(lambda: _free_everything(engine), "every block to be freed")
        await engine.stop()
    asyncio.run(main())


def test_shared_prefix_is_reused_and_output_unchanged():
    async def main():
        worker = ShadowWorker(num_gpu_blocks=256, block_size=4)
        engine = _engine(worker)
        await engine.start()
        prefix = list(range(1, 41))  # 10 full blocks
        first = await _run(engine, {"a": (prefix + [7, 8], _params(5, 42))})
        computed_before = worker.num_computed_tokens
        second = await _run(engine, {"b": (prefix + [9], _params(5, 41))})
        assert first["a"][0] == reference_output(prefix + [7, 8], 5, None)
        assert second["b"][0] == reference_output(prefix + [9], 5, None)
        # b computed only its last token past the 40 cached ones, plus 4 decodes.
        assert worker.num_computed_tokens - computed_before == 1 + 4
        assert engine.stats().prefix_hit_tokens == 40
        await engine.stop()
    asyncio.run(main())


def test_parallel_samples_share_the_prompt_blocks():
    async def main():
        worker = ShadowWorker(num_gpu_blocks=512, block_size=4)
        engine = _engine(worker)
        await engine.start()
        prompt = [1 + i % 90 for i in range(101)]  # 101 tokens: 26 blocks, the last one partial
        params = _params(8, len(prompt), n=4, seed=123)
        peak = 0
        stream = engine.submit("p", prompt, params)
        outs: dict[int, list[int]] = {}
        async for resp in stream:
            kv = engine.workers[0].kv
            peak = max(peak, kv.gpu.num_blocks - kv.gpu.num_free_blocks)
            for o in resp.outputs:
                outs.setdefault(o.index, []).extend(o.token_ids)
        for i in range(4):
            assert outs[i] == reference_output(prompt, 8, 123 + i)
        prompt_blocks = 26
        generated_blocks = -(-8 // 4)
        assert peak <= prompt_blocks + 4 * generated_blocks + 4, peak
        await engine.stop()
    asyncio.run(main())


def test_abort_mid_stream_frees_every_block():
    async def main():
        worker = ShadowWorker(num_gpu_blocks=128)
        engine = _engine(worker)
        await engine.start()
        prompt = list(range(1, 30))
        stream = engine.submit("x", prompt, _params(200, len(prompt)))
        seen = 0
        with pytest.raises(Aborted):  # the consumer is told: not a normal end
            async for resp in stream:
                seen += len(resp.outputs[0].token_ids)
                if seen >= 5:
                    assert engine.abort("x")
        await _eventually(lambda: _free_everything(engine) and worker.seqs == {},
                          "the aborted request to be freed on both sides")
        assert engine.stats().num_running == 0
        await engine.stop()
    asyncio.run(main())


def test_a_failed_worker_loses_only_kv_its_requests_finish_elsewhere_without_a_gap():
    async def main():
        workers = [ShadowWorker(num_gpu_blocks=128, name=f"s{i}") for i in range(2)]
        engine = Engine(SchedulerConfig(), [InProcessWorkerHandle(w, f"s{i}")
                                            for i, w in enumerate(workers)])
        await engine.start()
        reqs = _mixed_requests(12, seed=4)
        streams = {rid: engine.submit(rid, p, pa) for rid, (p, pa) in reqs.items()}
        on_first = [rid for rid in reqs if engine.requests[rid].worker.handle.name == "s0"]
        assert on_first, "placement should spread requests"
        workers[0].fail_next_step = True

        async def collect(stream):
            toks = []
            async for resp in stream:
                toks.extend(t for o in resp.outputs for t in o.token_ids)
            return toks

        collected = await asyncio.gather(*(collect(s) for s in streams.values()))
        results = dict(zip(streams, collected, strict=True))
        for rid, (prompt, params) in reqs.items():
            assert results[rid] == reference_output(prompt, params.max_tokens, None), rid
        await engine.stop()
    asyncio.run(main())


def test_the_resolved_stop_set_ends_a_request_at_eos():
    """EOS joins ``stop_token_ids`` where the request is resolved; the engine stops on that set
    and on nothing it computes itself (``ignore_eos`` leaves EOS out of it)."""
    eos = 0  # the shadow worker's
    prompt = next(p for p in ([i, i + 1] for i in range(1, 99))
                  if eos in reference_output(p, 30, None)[:25])
    expected = reference_output(prompt, 30, None, eos=eos)

    def params(ignore_eos: bool):
        p = make_sampling_params(max_tokens=30, ignore_eos=ignore_eos)
        return resolve_sampling_params(p, num_prompt_tokens=len(prompt), max_model_len=4096,
                                       max_tokens_limit=4096, eos_token_ids=[eos])

    async def main():
        engine = _engine(ShadowWorker(num_gpu_blocks=64, eos=eos))
        await engine.start()
        stopped = await _run(engine, {"eos": (prompt, params(False))})
        ignored = await _run(engine, {"ignore": (prompt, params(True))})
        await engine.stop()
        assert stopped["eos"][0] == expected and expected[-1] == eos and len(expected) < 30
        assert ignored["ignore"][0] == reference_output(prompt, 30, None)
    asyncio.run(main())


def test_token_ids_that_bypassed_the_router_are_checked_by_the_scheduler():
    from pagedserve.core.errors import InvalidArgument

    async def main():
        engine = _engine(ShadowWorker(num_gpu_blocks=64, vocab_size=100))
        await engine.start()
        with pytest.raises(InvalidArgument, match=r"^prompt_token_ids\[1\]"):
            engine.submit("p", [5, 100], _params(4, 2))
        with pytest.raises(InvalidArgument, match=r"^generated_token_ids\[0\]"):
            engine.submit("g", [5, 6], _params(4, 2), generated_token_ids=[-1])
        assert not engine.requests
        await engine.stop()
    asyncio.run(main())


class _SizedShadowWorker(ShadowWorker):
    """Reports the step it was started for, as a real worker does (``WorkerInfo``)."""

    def __init__(self, max_num_batched_tokens: int, max_num_seqs: int, **kw) -> None:
        super().__init__(**kw)
        self.budget = (max_num_batched_tokens, max_num_seqs)

    def info(self):
        info = super().info()
        info.max_num_batched_tokens, info.max_num_seqs = self.budget
        return info


@pytest.mark.parametrize(("worker_budget", "flag"), [((1024, 256), "--max-num-batched-tokens"),
                                                     ((2048, 64), "--max-num-seqs")])
def test_a_worker_started_for_smaller_steps_than_the_scheduler_plans_is_refused(worker_budget,
                                                                               flag):
    async def main():
        engine = _engine(_SizedShadowWorker(*worker_budget), max_num_batched_tokens=2048,
                         max_num_seqs=256)
        with pytest.raises(ValueError, match=f"started with {flag}.*same {flag}"):
            await engine.start()
        await engine.stop()
    asyncio.run(main())


def test_a_worker_started_for_the_schedulers_steps_or_larger_joins():
    async def main():
        engine = _engine(_SizedShadowWorker(4096, 256), max_num_batched_tokens=2048)
        await engine.start()
        results = await _run(engine, {"r": ([1, 2, 3], _params(3, 3))})
        assert results["r"][0] == reference_output([1, 2, 3], 3, None)
        await engine.stop()
    asyncio.run(main())


def test_a_request_whose_steps_fail_is_not_moved_past_two_workers():
    """A request in the failed steps of two workers (each failure takes that worker out) ends
    with INTERNAL instead of going round every worker, so a third worker keeps serving. The
    count is per request, not per culprit: a bystander that shared both failed steps with it
    ends the same way (the engine cannot tell which request of a step made it fail); every
    other request finishes elsewhere with its exact output."""
    from pagedserve.core.errors import RequestFailed
    from scheduler.engine import MAX_WORKER_FAILURES

    engine: Engine

    class PoisonedHandle(InProcessWorkerHandle):
        """Raises, as a worker's step would on a device error, when "poison" is in the step."""

        num_faults = 0

        async def step(self, request):
            poison = engine.requests.get("poison")
            seq_ids = ({s.seq_id for s in poison.core_req.group.seqs} if poison is not None
                       else set())
            if seq_ids & set(request.scheduled.seq_ids):
                self.num_faults += 1
                raise RuntimeError("device error while stepping the poison")
            return await super().step(request)

    async def collect(stream):
        tokens: list[int] = []
        try:
            async for resp in stream:
                tokens.extend(t for o in resp.outputs for t in o.token_ids)
        except RequestFailed as exc:
            return tokens, exc
        return tokens, None

    async def main():
        nonlocal engine
        workers = [ShadowWorker(num_gpu_blocks=128, name=f"s{i}") for i in range(3)]
        handles = [PoisonedHandle(w, f"s{i}") for i, w in enumerate(workers)]
        engine = Engine(SchedulerConfig(), handles)
        await engine.start()
        streams = {"poison": engine.submit("poison", [5, 6, 7], _params(20, 3))}
        reqs = _mixed_requests(6, seed=9)
        streams.update({rid: engine.submit(rid, p, pa) for rid, (p, pa) in reqs.items()})
        first = {rid: engine.requests[rid].worker.handle.name for rid in streams}
        collected = await asyncio.gather(*(collect(s) for s in streams.values()))
        await engine.stop()
        return handles, reqs, first, dict(zip(streams, collected, strict=True))

    handles, reqs, first, results = asyncio.run(main())
    _, error = results.pop("poison")
    assert error is not None and "not retried" in str(error)
    assert sum(h.num_faults for h in handles) == MAX_WORKER_FAILURES
    for rid, (prompt, params) in reqs.items():
        tokens, error = results[rid]
        if error is None:
            assert tokens == reference_output(prompt, params.max_tokens, None), rid
        else:  # it shared the poison's first worker, hence its failed step
            assert first[rid] == first["poison"], rid
    assert any(error is None for _, error in results.values())


def test_requested_logprobs_stream_with_their_tokens_however_the_consumer_is_paced():
    async def main():
        worker = ShadowWorker(num_gpu_blocks=64)
        engine = _engine(worker)
        await engine.start()
        prompt = [5, 4, 3, 2, 1]
        tokens: list[int] = []
        logprob_ids: list[int] = []
        async for resp in engine.submit("r", prompt, _params(9, len(prompt), logprobs=1)):
            for out in resp.outputs:
                tokens.extend(out.token_ids)
                logprob_ids.extend(lp.token_id for lp in out.logprobs)
            await asyncio.sleep(0.001)  # a consumer slower than the steps gets several at once
        assert tokens == reference_output(prompt, 9, None)
        assert logprob_ids == tokens
        await engine.stop()
    asyncio.run(main())
