"""The whole cluster over real gRPC (router -> scheduler -> worker on 127.0.0.1) with a tiny
random Llama: token-exact against Hugging Face, isolation under concurrency, cancellation that
frees every block, and clear errors for bad input."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
import torch

from pagedserve.client import AsyncClient
from protos.pagedserve.v1 import common_pb2, generation_pb2
from scheduler.config import SchedulerConfig
from tests.support.cluster import ClusterThread
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_factory import cpu_worker_config

transformers = pytest.importorskip("transformers")

NUM_BLOCKS = 128
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def model_dir():
    return tiny_llama_dir()


@pytest.fixture(scope="module")
def cluster(model_dir):
    c = ClusterThread([cpu_worker_config(model_dir, block_size=BLOCK_SIZE,
                                         num_gpu_blocks=NUM_BLOCKS)], SchedulerConfig())
    yield c
    c.stop()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _request(ids: list[int], max_tokens: int, **params) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=ids),
        params=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                         **params))


def _collect(stream) -> tuple[list[int], list[generation_pb2.GenerateResponse]]:
    msgs = list(stream)
    return [t for m in msgs if m.index == 0 for t in m.token_ids], msgs


def _prompts(seed: int, count: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def test_greedy_through_the_cluster_equals_hf(cluster, hf_model):
    for prompt in _prompts(0, 3, 5, 40):
        ours, msgs = _collect(cluster.generation.Generate(_request(prompt, 24), timeout=60))
        assert ours == hf_greedy(hf_model, prompt, 24)
        final = msgs[-1]
        assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert final.usage.prompt_tokens == len(prompt)
        assert final.usage.completion_tokens == 24


def test_greedy_through_the_offline_api_equals_hf(model_dir, hf_model):
    from pagedserve import LLM, make_sampling_params

    prompts = _prompts(1, 4, 5, 60)
    with LLM(str(model_dir), num_gpu_blocks=64, dtype="float32") as llm:
        outs = llm.generate(prompts, make_sampling_params(max_tokens=20, temperature=0,
                                                          ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, 20)


def test_32_concurrent_streams_each_equal_their_solo_run(cluster):
    rng = random.Random(5)
    cases = [(p, rng.randint(1, 40)) for p in _prompts(2, 32, 1, 120)]
    solo = {i: _collect(cluster.generation.Generate(_request(p, n), timeout=120))[0]
            for i, (p, n) in enumerate(cases)}

    async def together():
        async with AsyncClient(cluster.cluster.router_address) as client:
            async def one(i, p, n):
                toks = []
                async for r in client.generate(token_ids=p, max_tokens=n, temperature=0.0,
                                               ignore_eos=True, timeout=300):
                    toks.extend(r.token_ids)
                return i, toks
            return dict(await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(cases))))

    concurrent = asyncio.run(together())
    for i, (_, n) in enumerate(cases):
        assert len(concurrent[i]) == n
        assert concurrent[i] == solo[i], f"stream {i} differs when batched"
    assert cluster.all_blocks_free()


def test_cancelling_a_stream_aborts_it_and_frees_every_block(cluster):
    call = cluster.generation.Generate(_request(_prompts(3, 1, 50, 50)[0], 400), timeout=120)
    got = 0
    for msg in call:
        got += len(msg.token_ids)
        if got >= 5:
            busy = cluster.stats()
            assert busy.num_running == 1
            assert busy.workers[0].num_free_blocks < busy.workers[0].num_blocks
            call.cancel()
            break
    assert cluster.all_blocks_free(), cluster.stats()


def test_deadline_exceeded_aborts_and_frees_blocks(cluster):
    with pytest.raises(grpc.RpcError) as err:
        list(cluster.generation.Generate(_request([5, 6, 7], 450), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert cluster.all_blocks_free()


@pytest.mark.parametrize("params, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"max_tokens": 10, "temperature": -1.0}, "temperature"),
    ({"max_tokens": 10, "top_p": 0.0}, "top_p"),
    ({"max_tokens": 10, "top_p": 1.5}, "top_p"),
    ({"max_tokens": 10, "top_k": -2}, "top_k"),
])
def test_bad_sampling_params_are_invalid_argument_naming_the_field(cluster, params, field):
    req = generation_pb2.GenerateRequest(text="hello", params=common_pb2.SamplingParams(**params))
    with pytest.raises(grpc.RpcError) as err:
        list(cluster.generation.Generate(req, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_bad_prompts_are_invalid_argument(cluster):
    cases = [
        (generation_pb2.GenerateRequest(text=""), "prompt"),
        (generation_pb2.GenerateRequest(), "prompt"),
        (_request([1] * 600, 10), "prompt"),  # longer than the 512-token context
        (_request([1] * 500, 100), "max_tokens"),  # prompt + max_tokens beyond the context
    ]
    for req, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            list(cluster.generation.Generate(req, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, req
        assert field in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(cluster.generation.Generate(
            generation_pb2.GenerateRequest(text="hi", model="no-such-model"), timeout=10))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "model" in err.value.details()
    assert cluster.all_blocks_free()


def test_a_prompt_larger_than_the_kv_pool_is_refused_at_once(model_dir):
    c = ClusterThread([cpu_worker_config(model_dir, block_size=16, num_gpu_blocks=4)])
    try:
        with pytest.raises(grpc.RpcError) as err:
            list(c.generation.Generate(_request(list(range(3, 103)), 8), timeout=30))
        # Refused, not queued until the deadline (which would end it DEADLINE_EXCEEDED).
        assert err.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    grpc.StatusCode.INVALID_ARGUMENT)
        assert "KV" in err.value.details() or "context" in err.value.details()
        assert c.stats().num_waiting == 0
    finally:
        c.stop()


def test_text_chat_and_stop_strings_through_the_cluster(cluster):
    msgs = list(cluster.generation.Generate(generation_pb2.GenerateRequest(
        chat=generation_pb2.ChatMessages(messages=[
            generation_pb2.ChatMessage(role="user", content="hello there")]),
        params=common_pb2.SamplingParams(max_tokens=12, temperature=0.0)), timeout=60))
    assert msgs[-1].finish_reason in (
        common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH
    )
    text = "".join(m.text for m in msgs)
    assert msgs[-1].usage.completion_tokens >= 1
    if len(text) > 3:  # stop on a substring of what greedy produced: output ends right before it
        stop = text[2:4]
        again = list(cluster.generation.Generate(generation_pb2.GenerateRequest(
            chat=generation_pb2.ChatMessages(messages=[
                generation_pb2.ChatMessage(role="user", content="hello there")]),
            params=common_pb2.SamplingParams(max_tokens=12, temperature=0.0, stop=[stop])),
            timeout=60))
        assert "".join(m.text for m in again) == text[: text.index(stop)]
        assert again[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert cluster.all_blocks_free()
