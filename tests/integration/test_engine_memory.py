"""PagedAttention memory management through the real engine and a tiny random Llama: sharing
for parallel sampling, beam search equal to Hugging Face, prefix caching (also between requests
admitted in the same step), preemption by swap and by recompute, chunked prefill, and placement
across two workers."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from pagedserve import LLM, make_sampling_params
from pagedserve.core.sampling import resolve_sampling_params
from scheduler.config import BatchingConfig, CacheConfig, SchedulerConfig
from scheduler.engine import Engine
from scheduler.worker_handle import InProcessWorkerHandle
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_factory import cpu_worker
from worker.kernels import cpu_ops
from worker.models.execution import ExecutionPath

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir():
    return tiny_llama_dir(max_position_embeddings=2048)


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(length)]


def _greedy(max_tokens: int, **kw):
    return make_sampling_params(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def test_parallel_sampling_shares_the_prompt_blocks(model_dir):
    block = 16
    prompt = _prompt(0, 300)  # 19 blocks, the last one partial
    max_tokens = 20
    with LLM(str(model_dir), num_gpu_blocks=200, dtype="float32", block_size=block) as llm:
        kv = llm.engine.workers[0].kv
        peak = 0
        original_step = llm.worker.step

        def watching_step(req):
            nonlocal peak
            peak = max(peak, kv.gpu.num_blocks - kv.gpu.num_free_blocks)
            return original_step(req)

        llm.worker.step = watching_step
        params = make_sampling_params(max_tokens=max_tokens, n=4, temperature=1.0, seed=3,
                                      ignore_eos=True)
        out = llm.generate([prompt], params)[0]
    assert len(out.outputs) == 4
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1, "samples should differ"
    prompt_blocks = -(-len(prompt) // block)
    generated_blocks = -(-max_tokens // block)
    assert peak <= prompt_blocks + 4 * generated_blocks + 4, peak
    assert peak < 2 * prompt_blocks  # far from 4 copies of the prompt


def _hf_beam(hf, prompt, width, max_tokens, eos=None):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          num_beams=width, max_new_tokens=max_tokens, eos_token_id=eos,
                          pad_token_id=0, length_penalty=1.0, early_stopping=False)
    ref = out[0, len(prompt):].tolist()
    if eos is not None and eos in ref:  # HF pads finished hypotheses after their EOS
        ref = ref[: ref.index(eos) + 1]
    return ref


@pytest.mark.parametrize("width", [2, 4])
def test_beam_search_equals_transformers(model_dir, hf, width):
    with LLM(str(model_dir), num_gpu_blocks=128, dtype="float32", block_size=4) as llm:
        for seed in range(3):
            prompt = _prompt(10 + seed, 5 + 4 * seed)
            params = make_sampling_params(max_tokens=12, beam_width=width, temperature=0,
                                          ignore_eos=True)
            ours = llm.generate([prompt], params)[0].outputs[0].token_ids
            assert ours == _hf_beam(hf, prompt, width, 12)
            # With an end token that the beams actually produce, hypotheses finish early.
            end = ours[len(ours) // 2]
            params = make_sampling_params(max_tokens=12, beam_width=width, temperature=0,
                                          ignore_eos=True, stop_token_ids=[end])
            ours = llm.generate([prompt], params)[0].outputs[0].token_ids
            assert ours == _hf_beam(hf, prompt, width, 12, eos=end)
        kv = llm.engine.workers[0].kv
        assert kv.gpu.num_free_blocks == kv.gpu.num_blocks  # every beam's blocks came back


def test_shared_512_token_prefix_reuses_every_full_block(model_dir):
    prefix = _prompt(1, 512)
    first, second = prefix + _prompt(2, 9), prefix + _prompt(3, 13)
    with LLM(str(model_dir), num_gpu_blocks=256, dtype="float32", block_size=16) as llm:
        a = llm.generate([first], _greedy(16))[0]
        b = llm.generate([second], _greedy(16))[0]
        stats = llm.engine.stats()
    with LLM(str(model_dir), num_gpu_blocks=256, dtype="float32", block_size=16,
             enable_prefix_caching=False) as plain:
        a_ref, b_ref = plain.generate([first, second], _greedy(16))
    assert b.num_cached_tokens == 512  # all 32 full blocks of the prefix
    assert stats.prefix_hit_tokens >= 512
    assert a.outputs[0].token_ids == a_ref.outputs[0].token_ids
    assert b.outputs[0].token_ids == b_ref.outputs[0].token_ids


def _record_steps(llm, measure) -> list:
    """Wraps ``llm``'s worker so every step appends ``measure(step request)`` to the list."""
    seen: list = []
    original_step = llm.worker.step

    def recording_step(req):
        seen.append(measure(req))
        return original_step(req)

    llm.worker.step = recording_step
    return seen


@pytest.mark.parametrize("kernels", ["cpu_ops", "torch"])
def test_requests_admitted_in_one_step_share_the_prefix_computed_in_that_step(
        model_dir, kernels, monkeypatch):
    """The first request computes the 96-token prefix; the others, admitted in the same step,
    read its K/V from the blocks that step writes (a 1-token suffix goes through the decode
    kernels). Greedy outputs equal prefix caching off, on the fused C++ path and on torch ops."""
    if kernels == "torch":
        monkeypatch.setattr(cpu_ops, "load", lambda: None)
    elif cpu_ops.load() is None:
        pytest.skip("fused CPU kernels unavailable")
    prefix = _prompt(60, 96)  # 6 full blocks of 16
    prompts = [prefix + _prompt(61 + i, 3 + 5 * i) for i in range(4)] + [prefix + [7]]
    with LLM(str(model_dir), num_gpu_blocks=256, dtype="float32", block_size=16) as llm:
        batch_sizes = _record_steps(llm, lambda req: len(req.scheduled.seq_ids))
        outs = llm.generate(prompts, _greedy(10))
        path = llm.worker.runner.execution.path
        kv = llm.engine.workers[0].kv
        assert kv.gpu.num_free_blocks == kv.gpu.num_blocks
    # the path this case is about: the C++ layer stack, or torch ops
    assert path is (ExecutionPath.FUSED_CPU_STACK if kernels == "cpu_ops" else ExecutionPath.TORCH)
    with LLM(str(model_dir), num_gpu_blocks=256, dtype="float32", block_size=16,
             enable_prefix_caching=False) as plain:
        reference = plain.generate(prompts, _greedy(10))
    assert batch_sizes[0] == len(prompts), "all admitted in the first step"
    assert [o.num_cached_tokens for o in outs] == [0, 96, 96, 96, 96]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in reference]


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_gives_outputs_identical_to_an_unconstrained_run(model_dir, mode):
    prompts = [_prompt(20 + i, 20 + 7 * i) for i in range(8)]
    params = _greedy(40)
    with LLM(str(model_dir), num_gpu_blocks=256, dtype="float32", block_size=8) as big:
        reference = [o.outputs[0].token_ids for o in big.generate(prompts, params)]
    with LLM(str(model_dir), num_gpu_blocks=24, dtype="float32", block_size=8,
             preemption_mode=mode, swap_space_gib=0.05) as small:
        outs = [o.outputs[0].token_ids for o in small.generate(prompts, params)]
        sched = small.engine.workers[0].sched
        assert sched.num_preemptions[mode] > 0, sched.num_preemptions
        kv = small.engine.workers[0].kv
        assert kv.gpu.num_free_blocks == kv.gpu.num_blocks
    assert outs == reference


def test_chunked_prefill_keeps_decodes_running_and_matches(model_dir):
    long_prompt, short_prompt = _prompt(30, 400), _prompt(31, 10)
    with LLM(str(model_dir), num_gpu_blocks=128, dtype="float32", block_size=16,
             max_num_batched_tokens=64) as llm:
        steps = _record_steps(llm, lambda req: sum(req.scheduled.num_new_tokens))
        outs = llm.generate([short_prompt, long_prompt], _greedy(12))
    assert max(steps) <= 64
    with LLM(str(model_dir), num_gpu_blocks=128, dtype="float32", block_size=16) as ref:
        expected = ref.generate([short_prompt, long_prompt], _greedy(12))
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]


def test_two_workers_place_a_common_prefix_where_it_is_cached(model_dir):
    async def main():
        workers = [cpu_worker(model_dir, num_gpu_blocks=128) for _ in range(2)]
        handles = [InProcessWorkerHandle(w, f"w{i}") for i, w in enumerate(workers)]
        placements: list[tuple[str, str]] = []

        class Placements:
            def on_placement(self, worker: str, reason: str) -> None:
                placements.append((worker, reason))

            def on_step(self, stats) -> None:
                return None

            def on_finished(self, group, error) -> None:
                return None

        engine = Engine(SchedulerConfig(batching=BatchingConfig(), cache=CacheConfig()), handles,
                        observers=[Placements()])
        await engine.start()
        prefix = _prompt(40, 96)

        def params(n):
            return resolve_sampling_params(_greedy(4), num_prompt_tokens=n, max_model_len=2048,
                                           max_tokens_limit=2048)

        async def run(rid, prompt):
            async for _ in engine.submit(rid, prompt, params(len(prompt))):
                pass

        await run("seed", prefix + [7])
        home = placements[-1][0]
        await run("other", _prompt(41, 30))  # unrelated: least loaded, either worker
        for i in range(3):
            await run(f"follow-{i}", prefix + [8 + i, 9])
            assert placements[-1] == (home, "prefix")
        await engine.stop()

    asyncio.run(main())


def test_best_of_returns_the_n_most_likely_of_best_of_samples_at_the_end(model_dir):
    """Samples are seeded per index, so n=5 streams exactly the 5 candidates best_of=5 draws."""
    prompt = _prompt(50, 30)

    async def run(n, best_of):
        worker = cpu_worker(model_dir, num_gpu_blocks=128)
        engine = Engine(SchedulerConfig(), [InProcessWorkerHandle(worker)])
        await engine.start()
        params = resolve_sampling_params(
            make_sampling_params(max_tokens=10, n=n, best_of=best_of, temperature=1.0, seed=11,
                                 ignore_eos=True),
            num_prompt_tokens=len(prompt), max_model_len=2048, max_tokens_limit=2048)
        messages = [m async for m in engine.submit("b", prompt, params)]
        await engine.stop()
        return messages

    messages = asyncio.run(run(2, 5))
    assert len(messages) == 1, "best_of > n streams nothing until the choice is made"
    outs = messages[0].outputs
    assert [o.index for o in outs] == [0, 1] and all(o.replaces for o in outs)
    candidates: dict[int, tuple[float, list[int]]] = {}
    for m in asyncio.run(run(5, 5)):
        for o in m.outputs:
            logprob, toks = candidates.get(o.index, (0.0, []))
            candidates[o.index] = (o.cumulative_logprob, toks + list(o.token_ids))
    best = sorted(candidates.values(), key=lambda c: -c[0])[:2]
    assert [list(o.token_ids) for o in outs] == [toks for _, toks in best]


def test_the_offline_path_passes_steps_as_objects_without_protobuf_or_recheck(model_dir, hf,
                                                                             monkeypatch):
    """The offline ``LLM``'s scheduler and worker share a process: no step is encoded, decoded or
    re-validated on the way, and greedy output still equals Hugging Face's."""
    import pagedserve.core.step_codec as codec
    import worker.worker as worker_module

    def refuse(*_args, **_kw):
        raise AssertionError("the in-process path must not use the codec or re-check steps")

    for name in ("encode_step", "decode_step", "encode_result", "decode_result"):
        monkeypatch.setattr(codec, name, refuse)
    monkeypatch.setattr(worker_module, "validate_step", refuse)
    prompt = _prompt(1, 40)
    with LLM(str(model_dir), num_gpu_blocks=64, dtype="float32", block_size=16) as llm:
        assert not llm.worker.check_steps
        out = llm.generate([prompt], _greedy(6))[0].outputs[0].token_ids
    ids = torch.tensor([prompt])
    with torch.no_grad():  # ignore_eos: HF neither stops at nor suppresses EOS
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert out == ref[0, len(prompt):].tolist()
