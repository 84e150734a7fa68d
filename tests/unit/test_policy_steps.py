"""The scheduling policy driven one step at a time, with no event loop: schedule, build the step,
commit it, the content-checking worker double runs it, sampled tokens are appended. Each test names
the policy behaviour (chunked prefill, swap, recompute, fork, prefix hits) and checks both what was
planned and that every output is the token-exact output of an unconstrained run (the double
fails on any stale or misplaced KV)."""

from __future__ import annotations

import itertools

from protos.pagedserve.v1 import common_pb2
from scheduler.config import BatchingConfig, CacheConfig
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.policy import StepPlan, WorkerScheduler
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus
from scheduler.step_builder import build_step, commit
from tests.support.shadow_worker import ShadowWorker, reference_output

BS = 4


class StepLoop:
    """The engine's cycle for one worker, synchronously."""

    def __init__(self, num_gpu_blocks: int = 64, num_cpu_blocks: int = 0, budget: int = 64,
                 mode: str = "recompute", caching: bool = True, break_even: int = 0) -> None:
        self.worker = ShadowWorker(num_gpu_blocks, max(num_cpu_blocks, 1), BS)
        kv = KVCacheManager(num_gpu_blocks, num_cpu_blocks, BS, enable_caching=caching)
        self.sched = WorkerScheduler(
            kv, BatchingConfig(max_num_batched_tokens=budget),
            CacheConfig(enable_prefix_caching=caching, preemption_mode=mode), itertools.count(1),
            break_even_context=break_even)
        self.plans: list[StepPlan] = []
        self._arrivals = itertools.count()
        self._step_ids = itertools.count(1)

    def add(self, prompt: list[int], max_tokens: int, n: int = 1,
            seed: int | None = None) -> SequenceGroup:
        arrival = next(self._arrivals)
        seq = Sequence(next(self.sched.seq_ids), 0, list(prompt), len(prompt))
        params = common_pb2.SamplingParams(max_tokens=max_tokens, n=n, seed=seed)
        group = SequenceGroup(f"r{arrival}", [seq], params, arrival, num_samples=n,
                              forked=n == 1)
        self.sched.add(group)
        return group

    def step(self) -> StepPlan:
        sched = self.sched
        plan = sched.schedule()
        step = build_step(next(self._step_ids), plan, sched.mirror)
        commit(plan, sched.mirror)
        result = self.worker.step(step)
        sched.mirror.cached.extend(sched.kv.commit_step())
        items = {item.seq.seq_id: item for item in plan.scheduled}
        for row in result.rows():
            item = items[row.seq_id]
            seq, group = item.seq, item.group
            seq.token_ids.append(row.token_id)
            if seq.num_output_tokens >= group.params.max_tokens:
                seq.status = SequenceStatus.FINISHED_LENGTH
                sched.release(seq)
            if group.is_finished:
                sched.remove(group)
        self.plans.append(plan)
        return plan

    def run(self, max_steps: int = 500) -> None:
        while self.sched.has_work:
            self.step()
            assert len(self.plans) < max_steps, "the policy stopped making progress"
        assert self.sched.kv.gpu.num_free_blocks == self.sched.kv.gpu.num_blocks, "blocks leaked"
        assert self.worker.seqs == {}, "the worker still holds sequences"


def _outputs(group: SequenceGroup) -> list[list[int]]:
    return [s.output_token_ids for s in sorted(group.seqs, key=lambda s: s.index)]


def test_a_long_prompt_is_prefilled_in_budget_sized_chunks_and_samples_once():
    loop = StepLoop(budget=8)
    prompt = list(range(1, 21))
    group = loop.add(prompt, max_tokens=3)
    loop.run()
    first = [(i.num_new_tokens, i.sample) for p in loop.plans[:3] for i in p.scheduled]
    assert first == [(8, False), (8, False), (4, True)]
    assert _outputs(group) == [reference_output(prompt, 3, None)]


def test_memory_pressure_swaps_the_latest_group_out_and_back_with_identical_outputs():
    loop = StepLoop(num_gpu_blocks=12, num_cpu_blocks=32, mode="swap")
    prompts = [[i * 10 + j for j in range(1, 8)] for i in range(1, 4)]
    groups = [loop.add(p, max_tokens=14) for p in prompts]
    loop.run()
    assert loop.sched.num_preemptions["swap"] > 0
    assert any(p.swap_out for p in loop.plans) and any(p.swap_in for p in loop.plans)
    for group, prompt in zip(groups, prompts, strict=True):
        assert _outputs(group) == [reference_output(prompt, 14, None)]


def test_memory_pressure_without_swap_space_recomputes_with_identical_outputs():
    loop = StepLoop(num_gpu_blocks=12, mode="recompute")
    prompts = [[i * 10 + j for j in range(1, 8)] for i in range(1, 4)]
    groups = [loop.add(p, max_tokens=14) for p in prompts]
    loop.run()
    assert loop.sched.num_preemptions["recompute"] > 0
    assert not any(p.swap_out for p in loop.plans)
    for group, prompt in zip(groups, prompts, strict=True):
        assert _outputs(group) == [reference_output(prompt, 14, None)]


def test_parallel_samples_fork_the_prompt_and_copy_only_the_partial_block():
    loop = StepLoop()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # two full blocks and a partial one
    group = loop.add(prompt, max_tokens=5, n=3, seed=11)
    loop.step()  # the first sequence computes all but the last prompt token
    plan = loop.step()  # forks: each computes the last token itself
    assert [len(p.forks) for p in loop.plans] == [0, 2]
    parent = group.seqs[0]
    assert all(s.blocks[:2] == parent.blocks[:2] for s in group.seqs)
    assert all(b.ref_cnt == 3 for b in parent.blocks[:2])
    assert len(plan.copies) == 2  # the shared partial block, copied once per extra writer
    loop.run()
    assert _outputs(group) == [reference_output(prompt, 5, 11 + i) for i in range(3)]


def test_a_later_request_reuses_the_cached_prefix_and_computes_only_its_suffix():
    loop = StepLoop()
    prefix = list(range(40, 52))  # three full blocks
    first = loop.add(prefix + [7, 8], max_tokens=2)
    loop.run()
    computed = loop.worker.num_computed_tokens
    second = loop.add(prefix + [9, 10, 11], max_tokens=2)
    loop.run()
    seq = second.seqs[0]
    assert seq.num_cached_tokens == 12
    assert loop.worker.num_computed_tokens - computed == 3 + 1  # the suffix, then one decode
    assert _outputs(first) == [reference_output(prefix + [7, 8], 2, None)]
    assert _outputs(second) == [reference_output(prefix + [9, 10, 11], 2, None)]


def test_chunks_deep_into_a_long_prompt_shrink_so_no_step_costs_more_than_the_budget():
    """With the model's attention break-even context ``k`` known, a chunk whose mean context is
    beyond ``k`` is weighted by how far beyond: the long prompt's late chunks shrink, every
    step's cost (decodes 1 each, chunks by ``chunk_cost``) stays within the budget, the decode
    sharing those steps keeps getting a token every step, and outputs stay exact."""
    from scheduler.policy import chunk_cost, max_chunk

    budget, k = 32, 24
    loop = StepLoop(num_gpu_blocks=128, budget=budget, break_even=k)
    decoding = loop.add([7, 8, 9], max_tokens=40)
    loop.step()  # its prefill; it decodes from now on
    prompt = [1 + i % 90 for i in range(200)]
    long = loop.add(prompt, max_tokens=2)
    chunks = []
    while long.seqs[0].num_computed_tokens < 200:
        plan = loop.step()
        mine = [i for i in plan.scheduled if i.seq is long.seqs[0]]
        assert [i.seq for i in plan.scheduled if i.seq is not long.seqs[0]] == [decoding.seqs[0]]
        start = long.seqs[0].num_computed_tokens - mine[0].num_new_tokens
        chunks.append((start, mine[0].num_new_tokens))
        cost = 1 + chunk_cost(start, mine[0].num_new_tokens, k)
        assert cost <= budget, (start, mine[0].num_new_tokens)
    sizes = [n for _, n in chunks]
    assert sizes[0] == budget - 1  # near the start: tokens only, as without the weighting
    assert sizes == sorted(sizes, reverse=True) and sizes[-2] < sizes[0] // 2
    # The largest chunk that fits, not just some chunk that fits (the last one is the rest).
    for start, n in chunks[:-1]:
        assert n == max_chunk(start, 200 - start, budget - 1, k)
    loop.run()
    assert _outputs(long) == [reference_output(prompt, 2, None)]
    assert _outputs(decoding) == [reference_output([7, 8, 9], 40, None)]


def test_chunk_cost_is_tokens_within_break_even_and_zero_turns_it_off():
    from scheduler.policy import chunk_cost, max_chunk

    assert chunk_cost(0, 2048, 3072) == 2048 and chunk_cost(5000, 2048, 0) == 2048
    assert chunk_cost(6144, 2048, 3072) == 2048 * 2 + 2048 * 2048 // (2 * 3072) + 1
    assert chunk_cost(10_000, 1, 3072) == 1  # a decode token counts 1
    n = max_chunk(6144, 2048, 2048, 3072)
    assert chunk_cost(6144, n, 3072) <= 2048 < chunk_cost(6144, n + 1, 3072)
    assert max_chunk(6144, 2048, 2048, 0) == 2048 and max_chunk(0, 10, 0, 3072) == 0
