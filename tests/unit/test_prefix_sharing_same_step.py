"""Same-step prefix sharing: a request admitted in the same scheduler step as the request that
computes its prefix shares those blocks (as vLLM does: a block is cached as soon as it is
scheduled, because in every layer the worker writes the K/V of the whole batch before attention
reads the cache).

First the scheduler alone (``WorkerScheduler`` + ``KVCacheManager``, steps simulated by hand:
block tables, ref counts, freeing, chunked prefill, preemption, abort), then the engine against
the content-checking worker double (tests/support/shadow_worker.py), which applies a step in the
model's order (every write, then every read) and checks every position a sequence reads.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

import pytest

from pagedserve.core.errors import Aborted
from pagedserve.core.sampling import make_sampling_params, resolve_sampling_params
from protos.pagedserve.v1 import common_pb2
from scheduler.config import BatchingConfig, CacheConfig, SchedulerConfig
from scheduler.engine import Engine
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.policy import StepPlan, WorkerScheduler
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus
from scheduler.step_builder import build_step, commit
from scheduler.worker_handle import InProcessWorkerHandle
from tests.support.shadow_worker import ShadowWorker, reference_output

BS = 4
PREFIX = [11, 12, 13, 14, 21, 22, 23, 24]  # two full blocks


# ---- the scheduler alone -------------------------------------------------------------------

def _scheduler(num_gpu_blocks: int = 32, num_cpu_blocks: int = 0, budget: int = 64,
               caching: bool = True, mode: str = "recompute") -> WorkerScheduler:
    kv = KVCacheManager(num_gpu_blocks, num_cpu_blocks, BS, enable_caching=caching)
    return WorkerScheduler(kv, BatchingConfig(max_num_batched_tokens=budget),
                           CacheConfig(enable_prefix_caching=caching, preemption_mode=mode),
                           itertools.count(100))


def _add(sched: WorkerScheduler, request_id: str, tokens: list[int],
         arrival: int) -> SequenceGroup:
    seq = Sequence(seq_id=arrival + 1, index=0, token_ids=list(tokens),
                   num_prompt_tokens=len(tokens))
    group = SequenceGroup(request_id, [seq], common_pb2.SamplingParams(max_tokens=64), arrival,
                          forked=True)
    sched.add(group)
    return group


def _run_step(sched: WorkerScheduler, plan: StepPlan, next_token: int = 7) -> None:
    """What the engine does around the worker: build the delta and commit the plan (moves
    ``num_computed_tokens``), the step runs, its blocks count as written, each sampled sequence
    gets a token."""
    build_step(1, plan, sched.mirror)
    commit(plan, sched.mirror)
    sched.mirror.cached.extend(sched.kv.commit_step())
    for item in plan.scheduled:
        if item.sample:
            item.seq.token_ids.append(next_token)


def _assert_ref_counts(sched: WorkerScheduler) -> None:
    """Every block's ref count equals the block-table entries naming it, per pool."""
    seqs = [s for g in sched.groups() for s in g.seqs if s.blocks]
    for pool, status in ((sched.kv.gpu, False), (sched.kv.cpu, True)):
        refs = Counter(b.block_id for s in seqs
                       if (s.status == SequenceStatus.SWAPPED) == status for b in s.blocks)
        for block in pool.blocks:
            assert block.ref_cnt == refs.get(block.block_id, 0), block
        assert pool.num_free_blocks == sum(1 for b in pool.blocks if b.ref_cnt == 0)


@pytest.mark.parametrize("free_first", ["a", "b"])
def test_two_requests_admitted_together_share_the_prefix_and_compute_only_the_suffix(free_first):
    sched = _scheduler()
    kv = sched.kv
    a = _add(sched, "a", PREFIX + [31, 32], 0)
    b = _add(sched, "b", PREFIX + [41, 42], 1)
    plan = sched.schedule()

    assert [(i.seq.seq_id, i.num_new_tokens) for i in plan.scheduled] == [(1, 10), (2, 2)]
    sa, sb = a.seqs[0], b.seqs[0]
    assert sb.blocks[:2] == sa.blocks[:2]  # the same physical blocks, computed by a this step
    assert [blk.ref_cnt for blk in sa.blocks] == [2, 2, 1]
    assert sb.blocks[2] not in sa.blocks and sb.blocks[2].ref_cnt == 1
    assert sb.num_cached_tokens == sb.num_computed_tokens == 8
    assert kv.num_hit_tokens == 8
    assert kv.gpu.num_free_blocks == 32 - 4
    # The worker and the kvstore hear of the new hashes only once the step that writes them has
    # run (the worker with the next step).
    assert sched.mirror.cached == [] and kv.events.stored == []
    request = build_step(1, plan, sched.mirror)
    commit(plan, sched.mirror)
    assert list(request.cached) == []
    sched.mirror.cached.extend(kv.commit_step())
    written = sorted(blk.block_id for blk in sa.blocks[:2])
    assert sorted(bid for bid, _ in sched.mirror.cached) == written
    assert sorted(bid for bid, _ in build_step(2, sched.schedule(), sched.mirror).cached) == written
    assert sorted(bid for _, bid, _, _ in kv.drain_events().stored) == written
    _assert_ref_counts(sched)

    first, second = (a, b) if free_first == "a" else (b, a)
    sched.remove(first)
    assert [blk.ref_cnt for blk in second.seqs[0].blocks[:2]] == [1, 1]
    _assert_ref_counts(sched)
    sched.remove(second)
    assert kv.gpu.num_free_blocks == kv.gpu.num_blocks  # nothing leaked
    # The prefix stays cached (free, reusable) for the next request.
    assert kv.lookup_prefix(PREFIX + [5], 8).num_blocks == 2


def test_a_block_is_shared_only_once_a_step_writes_it_fully():
    sched = _scheduler(budget=7)
    kv = sched.kv
    a = _add(sched, "a", PREFIX + [31, 32], 0)
    b = _add(sched, "b", PREFIX + [41, 42], 1)
    plan = sched.schedule()  # a's first chunk: block 0 whole, block 1 three tokens of four
    assert [(i.seq.seq_id, i.num_new_tokens) for i in plan.scheduled] == [(1, 7)]
    assert kv.lookup_prefix(b.seqs[0].token_ids, 9).num_blocks == 1
    _run_step(sched, plan)

    sched.batching = BatchingConfig(max_num_batched_tokens=5)
    plan = sched.schedule()  # a's last 3 tokens complete block 1: b shares both blocks now
    assert [(i.seq.seq_id, i.num_new_tokens) for i in plan.scheduled] == [(1, 3), (2, 2)]
    assert b.seqs[0].blocks[:2] == a.seqs[0].blocks[:2]
    assert b.seqs[0].num_cached_tokens == 8
    _assert_ref_counts(sched)
    _run_step(sched, plan)
    sched.remove(a)
    sched.remove(b)
    assert kv.gpu.num_free_blocks == kv.gpu.num_blocks


def test_without_prefix_caching_nothing_is_shared():
    sched = _scheduler(caching=False)
    _add(sched, "a", PREFIX + [31, 32], 0)
    b = _add(sched, "b", PREFIX + [41, 42], 1)
    plan = sched.schedule()
    assert [i.num_new_tokens for i in plan.scheduled] == [10, 10]
    assert b.seqs[0].num_cached_tokens == 0
    assert sched.kv.gpu.num_free_blocks == 32 - 6


def test_the_computing_request_removed_mid_step_leaves_the_shared_blocks_to_the_sharer():
    sched = _scheduler()
    kv = sched.kv
    a = _add(sched, "a", PREFIX + [31, 32], 0)
    b = _add(sched, "b", PREFIX + [41, 42], 1)
    plan = sched.schedule()
    build_step(1, plan, sched.mirror)  # the step is on its way to the worker
    commit(plan, sched.mirror)
    shared = a.seqs[0].blocks[:2]
    sched.remove(a)  # aborted while the step runs
    assert [blk.ref_cnt for blk in shared] == [1, 1]  # b keeps them: not on the free queue
    assert kv.gpu.num_free_blocks == 32 - 3
    kv.commit_step()  # the step ran in full: a's blocks were written
    _assert_ref_counts(sched)
    # A newcomer still finds the prefix (b holds it), and b's own table is untouched.
    assert kv.lookup_prefix(PREFIX + [9], 8).blocks == shared == b.seqs[0].blocks[:2]
    sched.remove(b)
    assert kv.gpu.num_free_blocks == kv.gpu.num_blocks


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_a_preempted_sharer_gives_back_only_its_references(mode):
    # 8 blocks: a holds 3, b 1 of its own + a's 2; decodes then run the pool dry and the
    # latest arrival (b, the sharer) is preempted while a keeps computing on the shared blocks.
    sched = _scheduler(num_gpu_blocks=8, num_cpu_blocks=8 if mode == "swap" else 0, mode=mode)
    kv = sched.kv
    a = _add(sched, "a", PREFIX + [31, 32], 0)
    b = _add(sched, "b", PREFIX + [41, 42], 1)
    plan = sched.schedule()
    assert b.seqs[0].blocks[:2] == a.seqs[0].blocks[:2]
    _run_step(sched, plan)
    shared = a.seqs[0].blocks[:2]
    preempted: list[tuple[SequenceGroup, str]] = []
    for _ in range(12):
        plan = sched.schedule()
        preempted.extend(plan.preempted)
        _assert_ref_counts(sched)
        _run_step(sched, plan)
        if preempted:
            break
    assert preempted == [(b, mode)]
    assert a.seqs[0].blocks[:2] == shared and [blk.ref_cnt for blk in shared] == [1, 1]
    if mode == "swap":
        assert b.seqs[0].status == SequenceStatus.SWAPPED
        assert kv.cpu.num_free_blocks == kv.cpu.num_blocks - len(b.seqs[0].blocks)
    else:
        assert b.seqs[0].blocks == [] and b in sched.waiting
    sched.remove(a)
    sched.remove(b)
    assert kv.gpu.num_free_blocks == kv.gpu.num_blocks
    assert kv.cpu.num_free_blocks == kv.cpu.num_blocks


# ---- the engine against the content-checking worker double ---------------------------------

def _params(max_tokens: int, prompt_len: int):
    p = make_sampling_params(max_tokens=max_tokens, ignore_eos=True)
    return resolve_sampling_params(p, num_prompt_tokens=prompt_len, max_model_len=4096,
                                   max_tokens_limit=4096)


def _engine(worker: ShadowWorker, handle: InProcessWorkerHandle | None = None,
            **cache) -> Engine:
    batching = BatchingConfig(max_num_batched_tokens=cache.pop("budget", 2048))
    return Engine(SchedulerConfig(batching=batching, cache=CacheConfig(**cache)),
                  [handle or InProcessWorkerHandle(worker)])


async def _collect(stream) -> tuple[list[int], int]:
    tokens: list[int] = []
    cached = 0
    try:
        async for resp in stream:
            for o in resp.outputs:
                tokens.extend(o.token_ids)
                cached = max(cached, o.num_cached_tokens)
    except Aborted:  # aborted on the server's side: the stream says so
        pass
    return tokens, cached


def _prompts(num: int, prefix_len: int, suffix_len: int) -> dict[str, list[int]]:
    prefix = [1 + (7 * i) % 97 for i in range(prefix_len)]
    return {f"r{i}": prefix + [1 + (13 * i + j) % 97 for j in range(suffix_len)]
            for i in range(num)}


async def _submit_all(engine: Engine, prompts: dict[str, list[int]], max_tokens: int):
    """Every request is queued before the first step runs (submit is synchronous)."""
    streams = {rid: engine.submit(rid, p, _params(max_tokens, len(p)))
               for rid, p in prompts.items()}
    results = await asyncio.gather(*(_collect(s) for s in streams.values()))
    return dict(zip(streams, results, strict=True))


def _all_free(engine: Engine) -> bool:
    kv = engine.workers[0].kv
    return (kv.gpu.num_free_blocks == kv.gpu.num_blocks
            and kv.cpu.num_free_blocks == kv.cpu.num_blocks)


async def _all_released(engine: Engine, worker: ShadowWorker, timeout_s: float = 10.0) -> None:
    """Every block is free and the worker has dropped every sequence (the drop of finished
    sequences travels with a later step of the loop, so this polls rather than guesses a time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not (_all_free(engine) and worker.seqs == {}):
        assert loop.time() < deadline, "blocks or worker sequences were never released"
        await asyncio.sleep(0.01)


def test_engine_requests_submitted_together_read_the_prefix_written_in_their_first_step():
    async def main():
        worker = ShadowWorker(num_gpu_blocks=128, block_size=BS)
        engine = _engine(worker)
        steps: list[int] = []
        original = worker.step
        worker.step = lambda req: steps.append(len(req.scheduled.seq_ids)) or original(req)
        await engine.start()
        prompts = _prompts(4, prefix_len=40, suffix_len=3)  # 10 full prefix blocks
        results = await _submit_all(engine, prompts, max_tokens=5)
        for rid, prompt in prompts.items():
            assert results[rid][0] == reference_output(prompt, 5, None), rid
        assert steps[0] == 4, "all four are admitted in the first step"
        assert [results[f"r{i}"][1] for i in range(4)] == [0, 40, 40, 40]
        # r0 computes its 43 tokens, the three others only their 3-token suffix; 4 decodes each.
        assert worker.num_computed_tokens == 43 + 3 * 3 + 4 * 4
        assert worker.num_same_step_reads == 3 * 40
        assert engine.stats().prefix_hit_tokens == 3 * 40
        await _all_released(engine, worker)
        await engine.stop()
    asyncio.run(main())


def test_engine_a_one_token_suffix_reads_the_prefix_through_the_decode_path():
    async def main():
        worker = ShadowWorker(num_gpu_blocks=64, block_size=BS)
        engine = _engine(worker)
        await engine.start()
        prompts = {"a": PREFIX + [31], "b": PREFIX + [41]}
        results = await _submit_all(engine, prompts, max_tokens=3)
        assert results["a"][0] == reference_output(prompts["a"], 3, None)
        assert results["b"] == (reference_output(prompts["b"], 3, None), 8)
        assert worker.num_same_step_reads == 8
        await _all_released(engine, worker)
        await engine.stop()
    asyncio.run(main())


def test_engine_chunked_prefix_is_shared_from_the_step_that_completes_each_block():
    async def main():
        worker = ShadowWorker(num_gpu_blocks=128, block_size=BS)
        engine = _engine(worker, budget=18)
        await engine.start()
        prompts = _prompts(3, prefix_len=40, suffix_len=2)  # r0's 42 tokens take 3 steps
        results = await _submit_all(engine, prompts, max_tokens=4)
        for rid, prompt in prompts.items():
            assert results[rid][0] == reference_output(prompt, 4, None), rid
        # r1 and r2 join when r0's last chunk (tokens 36..41) completes the prefix.
        assert [results[f"r{i}"][1] for i in range(3)] == [0, 40, 40]
        assert worker.num_same_step_reads > 0
        await _all_released(engine, worker)
        await engine.stop()
    asyncio.run(main())


def test_engine_computing_request_aborted_while_its_step_runs_sharer_is_unharmed():
    async def main():
        worker = ShadowWorker(num_gpu_blocks=64, block_size=BS)
        engine: Engine

        class AbortingHandle(InProcessWorkerHandle):
            aborted = False

            async def step(self, request):
                if not self.aborted and len(request.scheduled.seq_ids) == 2:
                    self.aborted = engine.abort("a")  # the step is built and on its way
                return await super().step(request)

        handle = AbortingHandle(worker)
        engine = _engine(worker, handle)
        await engine.start()
        prompts = {"a": PREFIX + [31, 32, 33], "b": PREFIX + [41, 42]}
        results = await _submit_all(engine, prompts, max_tokens=6)
        assert handle.aborted
        assert results["b"] == (reference_output(prompts["b"], 6, None), 8)
        assert worker.num_same_step_reads == 8
        await _all_released(engine, worker)
        # a's blocks were written by the step that ran: the prefix is still served from cache.
        late = await _submit_all(engine, {"c": PREFIX + [51]}, max_tokens=2)
        assert late["c"] == (reference_output(PREFIX + [51], 2, None), 8)
        await engine.stop()
    asyncio.run(main())


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_engine_same_step_sharers_under_preemption_give_identical_outputs(mode):
    async def main():
        worker = ShadowWorker(num_gpu_blocks=24, num_cpu_blocks=64, block_size=BS)
        engine = _engine(worker, preemption_mode=mode)
        await engine.start()
        prompts = _prompts(6, prefix_len=16, suffix_len=2)
        results = await _submit_all(engine, prompts, max_tokens=30)
        for rid, prompt in prompts.items():
            assert results[rid][0] == reference_output(prompt, 30, None), rid
        sched = engine.workers[0].sched
        assert sched.num_preemptions[mode] > 0, sched.num_preemptions
        assert worker.num_same_step_reads > 0
        await _all_released(engine, worker)
        await engine.stop()
    asyncio.run(main())
