"""The official ``openai`` Python client against a real local cluster's HTTP API (router ->
scheduler -> worker over gRPC, tiny random Llama): completions and chat, streaming and not,
``n > 1``, logprobs, stop strings, the vLLM extensions, errors, a disconnect that frees every
block, and the same text through HTTP as through gRPC for the same request.

The model is random, so expected texts are never written down: each is what the same request
returns through gRPC (``Generation.Generate``, the path the cluster tests check against HF)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from pagedserve.core.sampling import make_sampling_params
from protos.pagedserve.v1 import generation_pb2
from tests.support.cluster import ClusterThread
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_factory import cpu_worker_config

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterThread]:
    c = ClusterThread([cpu_worker_config(tiny_llama_dir(), num_gpu_blocks=128)], http=True,
                      metrics=True)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def client(cluster: ClusterThread) -> Iterator[openai.OpenAI]:
    assert cluster.cluster.http_url is not None
    with openai.OpenAI(base_url=cluster.cluster.http_url + "/v1", api_key="unused",
                       max_retries=0, timeout=60) as c:
        yield c


def grpc_text(cluster: ClusterThread, *, prompt: str | None = None,
              messages: list[dict[str, str]] | None = None, **params: Any) -> list[str]:
    """Each output's text for the same request through gRPC."""
    request = generation_pb2.GenerateRequest(params=make_sampling_params(**params))
    if messages is not None:
        request.chat.messages.extend(generation_pb2.ChatMessage(**m) for m in messages)
    else:
        request.text = prompt or ""
    texts: dict[int, str] = {}
    for message in cluster.generation.Generate(request, timeout=60):
        texts[message.index] = texts.get(message.index, "") + message.text
    return [texts[i] for i in sorted(texts)]


# Each set of sampling parameters, with the names the HTTP API and gRPC give them.
SAME_AS_GRPC = [
    pytest.param({"temperature": 0.0, "max_tokens": 12}, {}, id="greedy"),
    pytest.param({"temperature": 0.0, "max_tokens": 12, "presence_penalty": 0.5,
                  "frequency_penalty": 0.3}, {"repetition_penalty": 1.2}, id="penalties"),
    pytest.param({"temperature": 1.0, "max_tokens": 12}, {"top_k": 1}, id="top-k-1"),
    pytest.param({"temperature": 0.8, "top_p": 0.9, "seed": 7, "max_tokens": 12},
                 {"min_p": 0.05}, id="seeded-sampling"),
    pytest.param({"max_tokens": 8, "n": 2}, {"use_beam_search": True, "best_of": 2},
                 id="beam-search"),
]


@pytest.mark.parametrize(("params", "extensions"), SAME_AS_GRPC)
def test_completion_text_equals_grpc_for_the_same_request(
        cluster: ClusterThread, client: openai.OpenAI, params: dict[str, Any],
        extensions: dict[str, Any]) -> None:
    grpc_params = {**params, **extensions}
    if grpc_params.pop("use_beam_search", False):
        grpc_params["beam_width"] = grpc_params.pop("best_of")
    expected = grpc_text(cluster, prompt=PROMPT, ignore_eos=True, **grpc_params)
    done = client.completions.create(model="model", prompt=PROMPT, **params,
                                     extra_body={"ignore_eos": True, **extensions})
    assert [c.text for c in done.choices] == expected
    assert [c.index for c in done.choices] == list(range(len(expected)))
    streamed = client.completions.create(model="model", prompt=PROMPT, stream=True, **params,
                                         extra_body={"ignore_eos": True, **extensions})
    texts = [""] * len(expected)
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == expected


def test_chat_streaming_and_not_equal_grpc(cluster: ClusterThread,
                                           client: openai.OpenAI) -> None:
    (expected,) = grpc_text(cluster, messages=MESSAGES, temperature=0.0, max_tokens=10)
    done = client.chat.completions.create(model="model", messages=MESSAGES,
                                          temperature=0, max_completion_tokens=10)
    (choice,) = done.choices
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason in ("stop", "length")
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    assert done.usage is not None and done.usage.completion_tokens <= 10
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model="model", messages=MESSAGES, temperature=0, max_tokens=10,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage


def test_completion_defaults_usage_and_cached_tokens(cluster: ClusterThread,
                                                     client: openai.OpenAI) -> None:
    prompt = "Blocks need not be contiguous; a block table maps each logical block. " * 4
    first = client.completions.create(model="model", prompt=prompt, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert first.usage is not None
    assert first.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions
    assert first.choices[0].finish_reason == "length"
    again = client.completions.create(model="model", prompt=prompt, temperature=0, max_tokens=2)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    # The second request finds the first one's full prompt blocks in the prefix cache.
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert cluster.all_blocks_free()


def test_n_samples_are_distinct_choices_reproducible_with_a_seed(
        client: openai.OpenAI) -> None:
    def run() -> Any:
        return client.completions.create(model="model", prompt=PROMPT, n=3, temperature=1.0,
                                         seed=11, max_tokens=8, extra_body={"ignore_eos": True})
    first, second = run(), run()
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len({c.text for c in first.choices}) > 1  # three samples, not one answer thrice
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.usage.completion_tokens == 3 * 8
    chat = client.chat.completions.create(model="model", messages=MESSAGES,
                                          n=2, temperature=1.0, max_tokens=4)
    assert [c.index for c in chat.choices] == [0, 1]


def test_logprobs_in_completion_and_chat_format(client: openai.OpenAI) -> None:
    done = client.completions.create(model="model", prompt=PROMPT, temperature=0, max_tokens=6,
                                     logprobs=2, extra_body={"ignore_eos": True})
    lp = done.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and len(top) <= 2
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the best one was chosen
        assert token in top

    chat = client.chat.completions.create(model="model", messages=MESSAGES,
                                          temperature=0, max_tokens=5, logprobs=True,
                                          top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert content is not None and len(content) == 5
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    bare = client.chat.completions.create(model="model", messages=MESSAGES,
                                          temperature=0, max_tokens=3, logprobs=True)
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)


def test_a_stop_string_ends_the_text_right_before_it(cluster: ClusterThread,
                                                     client: openai.OpenAI) -> None:
    (full,) = grpc_text(cluster, prompt=PROMPT, temperature=0.0, max_tokens=24, ignore_eos=True)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), full  # a stop string the greedy text really contains
    done = client.completions.create(model="model", prompt=PROMPT, temperature=0, max_tokens=24,
                                     stop=[stop], extra_body={"ignore_eos": True})
    assert done.choices[0].text == full[: full.index(stop)]
    assert done.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="model", prompt=PROMPT, temperature=0,
                                         max_tokens=24, stop=stop, stream=True,
                                         extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]
    assert cluster.all_blocks_free()


def test_bad_request_is_400_naming_the_field(cluster: ClusterThread,
                                             client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="model", prompt=PROMPT, top_p=1.5)
    assert err.value.status_code == 400 and err.value.param == "top_p"
    assert err.value.code == "invalid_argument" and "top_p: must be in (0, 1]" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="model", messages=MESSAGES,
                                       max_completion_tokens=10**6)
    assert err.value.param == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="model", prompt="x " * 600)  # beyond the context
    assert err.value.param == "prompt"
    assert cluster.stats().num_waiting == 0


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-5", prompt=PROMPT)
    assert err.value.code == "model_not_found" and err.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=MESSAGES)
    assert [m.id for m in client.models.list()] == ["model"]


def _count(metric: Any, **labels: str) -> float:
    return sum(s.value for family in metric.collect() for s in family.samples
               if s.name.endswith("_total") and s.labels == labels)


def test_a_client_that_disconnects_mid_stream_frees_every_block(
        cluster: ClusterThread, client: openai.OpenAI) -> None:
    finished = cluster.cluster.scheduler.observer.metrics.finished
    aborted = _count(finished, finished_reason="abort")
    stream = client.completions.create(model="model", prompt=list(range(10, 60)),
                                       temperature=0, max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))  # a token arrived: the request holds blocks on the worker
    assert first.choices[0].index == 0
    stats = cluster.stats()
    assert stats.num_running == 1
    assert stats.workers[0].num_free_blocks < stats.workers[0].num_blocks
    stream.close()  # the client hangs up mid-stream
    assert cluster.all_blocks_free()
    # ... because the scheduler aborted it (it did not run to its 400 tokens), and the router
    # counted the request as cancelled.
    assert _count(finished, finished_reason="abort") == aborted + 1
    metrics = cluster.cluster.router.metrics
    assert metrics is not None
    deadline = time.monotonic() + 5
    while _count(metrics.requests, protocol="http", outcome="cancelled", code="CANCELLED") != 1:
        assert time.monotonic() < deadline, "the disconnect was not counted as cancelled"
        time.sleep(0.05)


def test_health_tokenize_round_trip(cluster: ClusterThread) -> None:
    import json
    import urllib.request

    url = cluster.cluster.http_url
    with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
        assert resp.status == 200
    request = urllib.request.Request(f"{url}/tokenize", data=json.dumps(
        {"prompt": PROMPT}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        tokens = json.loads(resp.read())["tokens"]
    tokenized = cluster.generation.Tokenize(generation_pb2.TokenizeRequest(text=PROMPT),
                                            timeout=10)
    assert tokens == list(tokenized.token_ids)
