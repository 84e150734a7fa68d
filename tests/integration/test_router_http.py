"""The router's OpenAI-compatible HTTP API (aiohttp on 127.0.0.1:0) in front of the scripted fake
Scheduler of ``test_router_grpc``: status mapping, deadlines, disconnects, batches, metrics.

Everything here is decided by the router alone; ``test_openai_api.py`` runs the official
``openai`` client against a real cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from pagedserve.client import AsyncClient
from pagedserve.core.models import default_model_path
from protos.pagedserve.v1 import common_pb2, scheduler_pb2_grpc
from router.config import RouterConfig, ServerConfig
from router.server import RouterServer, start_router
from router.tokenizer import Tokenizer, load_tokenizer
from tests.integration import test_router_grpc as fakes

FakeScheduler = fakes.FakeScheduler
token_outputs = fakes.token_outputs


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(default_model_path())


@contextlib.asynccontextmanager
async def serving(tokenizer: Tokenizer, fake: FakeScheduler, request_timeout_s: float = 30
                  ) -> AsyncIterator[tuple[RouterServer, aiohttp.ClientSession]]:
    """The router with its HTTP API on a free port, and an HTTP session against it."""
    scheduler = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(fake, scheduler)
    scheduler_port = scheduler.add_insecure_port("127.0.0.1:0")
    await scheduler.start()
    cfg = RouterConfig(scheduler_address=f"127.0.0.1:{scheduler_port}",
                       server=ServerConfig(host="127.0.0.1", port=0, grace_s=0.1, http_port=0),
                       max_tokens_limit=128, request_timeout_s=request_timeout_s,
                       startup_timeout_s=5)
    router = await start_router(cfg, tokenizer)
    assert router.http is not None
    try:
        async with aiohttp.ClientSession(router.http.url) as session:
            yield router, session
    finally:
        await router.stop()
        await scheduler.stop(0)


def sample(router: RouterServer, name: str, **labels: str) -> float | None:
    assert router.metrics is not None
    m = router.metrics
    for metric in (m.requests, m.streams_in_flight, m.prompt_tokens, m.generated_tokens,
                   m.ttft, m.e2e):
        for family in metric.collect():
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return s.value
    return None


async def events(response: aiohttp.ClientResponse) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream, ``[DONE]`` as the string."""
    out = []
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def eventually(check: Any, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(("code", "status", "kind"), [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
    (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
])
def test_scheduler_refusals_map_to_http_statuses_in_openai_shape(
        tokenizer: Tokenizer, code: grpc.StatusCode, status: int, kind: str) -> None:
    async def main() -> None:
        async with serving(tokenizer, FakeScheduler(error=code)) as (router, http):
            # n=2: a multi-output request is never continued after UNAVAILABLE, so it fails
            # at once (a single one is resubmitted first, as over gRPC).
            async with http.post("/v1/completions", json={
                    "prompt": "hi", "n": 2, "temperature": 1.0, "max_tokens": 4}) as resp:
                body = await resp.json()
                assert resp.status == status, body
            assert body["error"]["type"] == kind
            assert body["error"]["code"] == code.name.lower()
            assert "queue full" in body["error"]["message"]
            for stream in (True,):  # the same refusal before a stream starts: a status too
                async with http.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "hi"}], "n": 2,
                        "temperature": 1.0, "stream": stream}) as resp:
                    assert resp.status == status
        assert sample(router, "pagedserve_router_requests_total", protocol="http",
                      outcome="rejected" if status < 500 else "error", code=code.name) == 2

    asyncio.run(main())


def test_bad_fields_are_400_naming_the_clients_field(tokenizer: Tokenizer) -> None:
    cases = [
        ("/v1/completions", {"prompt": "x", "top_p": 0.0}, "top_p"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 129}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "", "max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": [5, 49152]}, "prompt[1]"),
        ("/v1/completions", {"prompt": ["ok", [5, 49152]]}, "prompt[1][1]"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop[0]"),
        ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}},
         "stream_options"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "", "content": "x"}]},
         "messages[0].role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "max_completion_tokens": 0}, "max_completion_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "logprobs": True, "top_logprobs": 30}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "use_beam_search": True, "n": 2, "temperature": 0.5},
         "temperature"),
    ]

    async def main() -> None:
        fake = FakeScheduler()
        async with serving(tokenizer, fake) as (_, http):
            for path, body, param in cases:
                async with http.post(path, json=body) as resp:
                    error = (await resp.json())["error"]
                    assert resp.status == 400, (body, error)
                assert error["param"] == param, (body, error)
                assert error["message"].startswith(f"{param}: "), error
                assert error["type"] == "invalid_request_error"
            async with http.post("/v1/completions", data=b"{not json") as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["param"] == "body"
            async with http.post("/v1/completions", json={"prompt": "x"},
                                 headers={"X-Request-Timeout": "soon"}) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["param"] == "X-Request-Timeout"
        assert not fake.requests  # all refused before the scheduler saw them

    asyncio.run(main())


def test_unknown_model_path_and_method_are_404_405_in_openai_shape(tokenizer: Tokenizer) -> None:
    async def main() -> None:
        async with serving(tokenizer, FakeScheduler()) as (_, http):
            async with http.post("/v1/completions", json={"prompt": "x", "model": "gpt-5"}) as r:
                assert r.status == 404
                error = (await r.json())["error"]
            assert (error["code"], error["param"]) == ("model_not_found", "model")
            async with http.get("/v1/models/gpt-5") as r:
                assert r.status == 404
            async with http.get("/v1/models/smollm2") as r:
                assert (await r.json())["id"] == "smollm2"
            async with http.get("/v2/nothing") as r:
                assert r.status == 404 and "error" in await r.json()
            async with http.get("/v1/completions") as r:
                assert r.status == 405 and "error" in await r.json()

    asyncio.run(main())


def test_streamed_completion_has_chunks_usage_and_done(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" Hello, wörld 👋!")

    async def main() -> None:
        fake = FakeScheduler(outputs=token_outputs(ids, common_pb2.FINISH_REASON_LENGTH))
        body = {"prompt": "Hi there", "max_tokens": len(ids), "stream": True,
                "stream_options": {"include_usage": True}}
        async with serving(tokenizer, fake) as (router, http), http.post(
                "/v1/completions", headers={"X-Request-Id": "abc"}, json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["X-Request-Id"] == "abc"
            got = await events(resp)
        assert got[-1] == "[DONE]"
        usage_chunk, chunks = got[-2], got[:-2]
        assert usage_chunk["choices"] == [] and usage_chunk["usage"] == {
            "prompt_tokens": len(tokenizer.encode("Hi there")), "completion_tokens": len(ids),
            "total_tokens": len(tokenizer.encode("Hi there")) + len(ids),
            "prompt_tokens_details": {"cached_tokens": 2}}
        assert all(c["id"] == "cmpl-abc" and c["object"] == "text_completion"
                   and c["usage"] is None for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == " Hello, wörld 👋!"
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
        assert fake.requests[0].request_id == "abc"
        assert sample(router, "pagedserve_router_requests_total", protocol="http",
                      outcome="ok", code="OK") == 1
        assert sample(router, "pagedserve_router_generated_tokens_total",
                      protocol="http") == len(ids)

    asyncio.run(main())


def test_http_and_grpc_share_the_scheduler_call_and_are_counted_apart(
        tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" a b c")

    async def main() -> None:
        fake = FakeScheduler(outputs=token_outputs(ids, common_pb2.FINISH_REASON_LENGTH))
        async with serving(tokenizer, fake) as (router, http):
            async with http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}) as r:
                assert (await r.json())["choices"][0]["text"] == " a b c"
            async with AsyncClient(f"127.0.0.1:{router.port}") as client:
                assert await client.generate_text("x", max_tokens=3) == " a b c"
                assert await client.generate_text("x", max_tokens=3) == " a b c"
        assert fake.num_calls == 1  # both protocols share the router's one Connect call
        for protocol, count in (("http", 1), ("grpc", 2)):
            assert sample(router, "pagedserve_router_requests_total", protocol=protocol,
                          outcome="ok", code="OK") == count
            assert sample(router, "pagedserve_router_time_to_first_token_seconds_count",
                          protocol=protocol) == count
            assert sample(router, "pagedserve_router_streams_in_flight", protocol=protocol) == 0

    asyncio.run(main())


def test_batch_prompts_make_one_request_each_with_ordered_choices(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" yes")

    async def main() -> None:
        fake = FakeScheduler(outputs=token_outputs(ids, common_pb2.FINISH_REASON_STOP, index=0)
                             + token_outputs(ids, common_pb2.FINISH_REASON_STOP, index=1))
        request = {"prompt": ["one", [5, 6, 7]], "n": 2, "temperature": 0.7}
        async with serving(tokenizer, fake) as (_, http), http.post(
                "/v1/completions", headers={"X-Request-Id": "b"}, json=request) as resp:
            body = await resp.json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
        assert all(c["text"] == " yes" and c["finish_reason"] == "stop" for c in body["choices"])
        assert sorted(r.request_id for r in fake.requests) == ["b-0", "b-1"]
        assert body["usage"]["prompt_tokens"] == len(tokenizer.encode("one")) + 3
        assert body["usage"]["completion_tokens"] == 4 * len(ids)

    asyncio.run(main())


def test_deadline_header_ends_the_request_504_and_aborts_upstream(tokenizer: Tokenizer) -> None:
    async def main() -> None:
        fake = FakeScheduler(outputs=token_outputs(tokenizer.encode(" x" * 3)), hang=True)
        async with serving(tokenizer, fake) as (router, http):
            async with http.post("/v1/completions", json={"prompt": "go", "max_tokens": 100},
                                 headers={"X-Request-Timeout": "0.5"}) as resp:
                error = (await resp.json())["error"]
                assert resp.status == 504, error
            assert error["code"] == "deadline_exceeded"
            await asyncio.wait_for(fake.cancelled.wait(), 5)
            assert 0 < fake.requests[0].timeout_s <= 0.5  # the same deadline travels upstream
        assert sample(router, "pagedserve_router_requests_total", protocol="http",
                      outcome="deadline_exceeded", code="DEADLINE_EXCEEDED") == 1

    asyncio.run(main())


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_aborts_its_request_upstream(
        tokenizer: Tokenizer, stream: bool) -> None:
    """Mid-stream, or while a non-streaming request waits for its whole answer: the handler is
    cancelled, the request aborted in the scheduler, the outcome counted as cancelled."""
    async def main() -> None:
        fake = FakeScheduler(outputs=token_outputs(tokenizer.encode(" x" * 3)), hang=True)
        async with serving(tokenizer, fake) as (router, http):
            resp = await http.post("/v1/completions", json={
                "prompt": "go", "max_tokens": 100, "stream": stream}) if stream else None
            if resp is not None:
                async for raw in resp.content:  # the first token arrived: then hang up
                    if raw.startswith(b"data: "):
                        break
                resp.close()
            else:
                task = asyncio.create_task(http.post("/v1/completions", json={
                    "prompt": "go", "max_tokens": 100}))
                await eventually(lambda: fake.requests)
                task.cancel()  # closes the connection
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.wait_for(fake.cancelled.wait(), 5)
            await eventually(lambda: sample(
                router, "pagedserve_router_requests_total", protocol="http",
                outcome="cancelled", code="CANCELLED") == 1)
            assert sample(router, "pagedserve_router_streams_in_flight", protocol="http") == 0

    asyncio.run(main())


def test_health_models_tokenize_and_detokenize(tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]

    async def main() -> None:
        async with serving(tokenizer, FakeScheduler()) as (router, http):
            async with http.get("/health") as r:
                assert r.status == 200
            async with http.get("/v1/models") as r:
                (card,) = (await r.json())["data"]
            assert (card["id"], card["object"], card["max_model_len"]) == (
                "smollm2", "model", fakes.MAX_MODEL_LEN)
            async with http.post("/tokenize", json={"prompt": "Hello world",
                                                    "return_token_strs": True}) as r:
                tok = await r.json()
            async with http.post("/tokenize", json={"messages": messages}) as r:
                chat = await r.json()
            async with http.post("/detokenize", json={"tokens": tok["tokens"]}) as r:
                assert (await r.json())["prompt"] == "Hello world"
            async with http.post("/detokenize", json={"tokens": [1, 10**6]}) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "tokens[1]"
            async with http.post("/tokenize", json={"prompt": ""}) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "prompt"
            assert router.http is not None
            router.http.set_serving(False)  # what stop() does first: load balancers drain
            async with http.get("/health") as r:
                assert r.status == 503
        assert tok["tokens"] == tokenizer.encode("Hello world")
        assert tok["count"] == len(tok["tokens"]) and tok["token_strs"][1] == "Ġworld"
        assert chat["tokens"] == tokenizer.encode_chat(messages)

    asyncio.run(main())
