"""A tensor-parallel group of 2 ranks (two real ``python -m worker`` processes, gloo on
loopback) behind a real scheduler gives the outputs of one whole worker: greedy, seeded parallel
sampling, beam search, prefix caching and swap preemption.

Numerics: the group sums each row-parallel projection over its ranks (all-reduce), which changes
the fp32 summation order, so logits differ from the whole model's by rounding. Greedy outputs are
compared token for token under the NEAR-TIE RULE: at the first position where they differ, the
whole model's top-2 log-probs must be a tie within fp32 rounding (``TIE_GAP``) and both runs,
teacher-forced on the same prefix, must give those two tokens the same log-probs (``LOGPROB_TOL``);
the outputs are not compared past that position (they continue from different tokens). Every
other position must match exactly, and a divergence is reported as a warning. Sampled and beam
outputs must match exactly (no rule: a rounding difference flips a seeded sample only if its
random threshold lands within that rounding).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from pagedserve.core.models import default_model_path
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.tp_group import Output, SchedulerThread, WorkerRanks, start_worker_ranks

pytestmark = [pytest.mark.external, pytest.mark.any_isa]  # worker processes, gloo
TIE_GAP = 1e-3  # top-2 log-probs this close are a rounding tie, not a disagreement
LOGPROB_TOL = 1e-3
BLOCK_SIZE = 8
NUM_GPU_BLOCKS = 40  # 320 tokens: the concurrent burst below must preempt
POOL_ARGS = ("--block-size", str(BLOCK_SIZE), "--num-gpu-blocks", str(NUM_GPU_BLOCKS),
             "--swap-space-gib", "0.01", "--max-num-batched-tokens", "256")

TINY_MODELS = {
    # 4 query heads over 2 KV heads: each rank holds 2 query heads and 1 KV head (split)
    "tiny-kv2": {},
    # 4 query heads over 1 KV head: both ranks hold the one KV head (replicated)
    "tiny-kv1": {"num_key_value_heads": 1},
}


def _prompt(seed: int, length: int, vocab: int = 512) -> list[int]:
    return [(seed * 7919 + i * 104_729) % (vocab - 3) + 3 for i in range(length)]


class Pair:
    """The same model as one whole worker (TP=1) and as a group of two ranks (TP=2), each
    behind its own scheduler."""

    def __init__(self, model: str, extra_args: tuple[str, ...] = ()) -> None:
        self.ranks: list[WorkerRanks] = []
        self.schedulers: list[SchedulerThread] = []
        try:
            for size in (1, 2):
                ranks = start_worker_ranks(model, size, extra_args=extra_args)
                self.ranks.append(ranks)
            for ranks in self.ranks:
                ranks.wait_ready()
                self.schedulers.append(SchedulerThread(ranks.leader_address, BLOCK_SIZE, 256))
        except BaseException:
            self.stop()
            raise

    @property
    def tp1(self) -> SchedulerThread:
        return self.schedulers[0]

    @property
    def tp2(self) -> SchedulerThread:
        return self.schedulers[1]

    def stop(self) -> None:
        for s in self.schedulers:
            s.stop()
        for r in self.ranks:
            r.stop()


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def tiny(request: pytest.FixtureRequest) -> Iterator[Pair]:
    pair = Pair(str(tiny_llama_dir(**TINY_MODELS[request.param])), POOL_ARGS)
    yield pair
    pair.stop()


def assert_greedy_equal(tp1: Output, tp2: Output, what: str) -> None:
    """Token for token, under the near-tie rule (module docstring)."""
    for i, (a, b) in enumerate(zip(tp1.token_ids, tp2.token_ids, strict=False)):
        if a == b:
            continue
        top1 = {t.token_id: t.logprob for t in tp1.logprobs[i].top}
        top2 = {t.token_id: t.logprob for t in tp2.logprobs[i].top}
        assert {a, b} <= top1.keys() and {a, b} <= top2.keys(), f"{what}: diverged at {i}"
        gap = abs(top1[a] - top1[b])
        assert gap < TIE_GAP, f"{what}: TP=2 chose {b} over {a} at {i}, not a tie ({gap:.2e})"
        for token in (a, b):  # teacher-forced: both runs scored the same prefix
            assert abs(top1[token] - top2[token]) < LOGPROB_TOL, (what, i, token)
        warnings.warn(f"{what}: fp32 near-tie at token {i} (gap {gap:.1e}); compared "
                      "teacher-forced log-probs there, not the tokens after it", stacklevel=2)
        return
    assert tp1.token_ids == tp2.token_ids, what


def test_group_pool_is_the_smallest_rank_pool_and_the_group_is_one_worker(tiny: Pair) -> None:
    workers = [s.stats().workers for s in tiny.schedulers]
    assert [len(w) for w in workers] == [1, 1]
    assert workers[1][0].num_blocks == workers[0][0].num_blocks == NUM_GPU_BLOCKS


def test_greedy_tp2_matches_tp1(tiny: Pair) -> None:
    for seed, length in ((1, 5), (2, 17), (3, 40)):
        prompt = _prompt(seed, length)
        params = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True, "logprobs": 2}
        tp1, tp2 = tiny.tp1.generate(prompt, **params), tiny.tp2.generate(prompt, **params)
        assert len(tp1[0].token_ids) == 24
        assert_greedy_equal(tp1[0], tp2[0], f"prompt {seed}")


def test_seeded_parallel_sampling_tp2_matches_tp1(tiny: Pair) -> None:
    params = {"max_tokens": 16, "temperature": 0.9, "top_k": 40, "seed": 7, "n": 3,
              "ignore_eos": True}
    prompt = _prompt(4, 12)
    tp1, tp2 = tiny.tp1.generate(prompt, **params), tiny.tp2.generate(prompt, **params)
    assert len(tp1) == 3 and len({tuple(o.token_ids) for o in tp1}) > 1, "samples differ"
    assert [o.token_ids for o in tp2] == [o.token_ids for o in tp1]


def test_beam_search_tp2_matches_tp1(tiny: Pair) -> None:
    params = {"max_tokens": 10, "beam_width": 3, "n": 3, "temperature": 0.0,
              "ignore_eos": True}
    prompt = _prompt(5, 9)
    tp1, tp2 = tiny.tp1.generate(prompt, **params), tiny.tp2.generate(prompt, **params)
    assert len(tp1) == 3
    assert [o.token_ids for o in tp2] == [o.token_ids for o in tp1]


def test_prefix_caching_tp2_reports_and_matches_tp1(tiny: Pair) -> None:
    shared = _prompt(6, 4 * BLOCK_SIZE)
    params = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "logprobs": 2}
    results = []
    for side in (tiny.tp1, tiny.tp2):
        side.generate(shared + [11], **params)
        results.append(side.generate(shared + [12, 13], **params)[0])
    tp1, tp2 = results
    assert tp1.num_cached_tokens == tp2.num_cached_tokens == 4 * BLOCK_SIZE
    assert_greedy_equal(tp1, tp2, "prefix-cached request")


def test_swap_preemption_tp2_matches_tp1(tiny: Pair) -> None:
    prompts = [_prompt(10 + i, 20 + 5 * i) for i in range(8)]  # ~ 2x the pool with outputs
    params = {"max_tokens": 32, "temperature": 0.0, "ignore_eos": True, "logprobs": 2}
    before = tiny.tp2.stats().num_preemptions
    tp2 = tiny.tp2.generate_concurrently(prompts, **params)
    assert tiny.tp2.stats().num_preemptions > before, "the burst did not preempt: nothing tested"
    tp1 = [tiny.tp1.generate(p, **params) for p in prompts]  # one at a time: no preemption
    for i, (a, b) in enumerate(zip(tp1, tp2, strict=True)):
        assert_greedy_equal(a[0], b[0], f"preempted request {i}")


def test_smollm2_greedy_tp2_matches_tp1() -> None:
    """The default model: 9 query heads over 3 KV heads, split 6 + 3 / 2 + 1."""
    prompts = {
        "chat": [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
        "The quick brown fox": [504, 2365, 6354, 16438],
    }
    pair = Pair(str(default_model_path()), ("--num-gpu-blocks", "64"))
    try:
        params = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True, "logprobs": 2}
        for name, prompt in prompts.items():
            tp1, tp2 = pair.tp1.generate(prompt, **params), pair.tp2.generate(prompt, **params)
            assert len(tp1[0].token_ids) == 16
            assert_greedy_equal(tp1[0], tp2[0], name)
    finally:
        pair.stop()
