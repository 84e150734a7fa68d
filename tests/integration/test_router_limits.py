"""Deliberate limits and clear statuses at the router's edge (issue 15): prompt size caps before
tokenizing, a message size limit below gRPC's parse, invalid UTF-8 and forged log lines refused
as INVALID_ARGUMENT, a server-side abort told apart from success, no prompt at INFO, and
keepalive settings that clients and servers agree on."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagedserve.core.grpc_util import channel_options, server_options
from protos.pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2
from router.config import RouterConfig
from tests.support.cluster import ClusterThread
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_factory import cpu_worker_config

MAX_PROMPT_BYTES = 2000
MAX_PROMPT_TOKENS = 64


@pytest.fixture(scope="module")
def cluster():
    c = ClusterThread([cpu_worker_config(tiny_llama_dir(), num_gpu_blocks=64)],
                      router_config=RouterConfig(max_prompt_bytes=MAX_PROMPT_BYTES,
                                                 max_prompt_tokens=MAX_PROMPT_TOKENS))
    yield c
    c.stop()


def _refusal(cluster: ClusterThread, request: generation_pb2.GenerateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        list(cluster.generation.Generate(request, timeout=30))
    return err.value


@pytest.mark.parametrize(("request_fields", "field"), [
    ({"text": "é" * (MAX_PROMPT_BYTES // 2 + 1)}, "prompt.text"),
    ({"chat": generation_pb2.ChatMessages(messages=[generation_pb2.ChatMessage(
        role="user", content="x" * MAX_PROMPT_BYTES)])}, "prompt.chat.messages"),
    ({"token_ids": generation_pb2.TokenIds(ids=[5] * (MAX_PROMPT_TOKENS + 1))},
     "prompt.token_ids"),
    ({"text": "hello " * 200}, "prompt"),  # under the byte cap, over the token cap
])
def test_prompts_over_the_configured_caps_are_invalid_argument(cluster, request_fields, field):
    error = _refusal(cluster, generation_pb2.GenerateRequest(**request_fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(field + ":"), error.details()


def test_a_message_far_over_the_cap_is_refused_before_parsing(cluster):
    error = _refusal(cluster, generation_pb2.GenerateRequest(text="x" * (8 * 1024 * 1024)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_invalid_utf8_is_invalid_argument(cluster):
    good = generation_pb2.GenerateRequest(text="hello").SerializeToString()
    raw = cluster.channel.unary_stream("/pagedserve.v1.Generation/Generate")
    with pytest.raises(grpc.RpcError) as err:
        list(raw(good.replace(b"hello", b"h\xffllo"), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "GenerateRequest" in err.value.details()
    tokenize = cluster.channel.unary_unary("/pagedserve.v1.Generation/Tokenize")
    with pytest.raises(grpc.RpcError) as err:
        tokenize(generation_pb2.TokenizeRequest(text="hello").SerializeToString()
                 .replace(b"hello", b"\xc3("), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("request_id", ["a\nINFO forged line", "a\rb", "a\u2028b", "a\x1b[2Jb"])
def test_request_ids_that_would_forge_log_lines_are_refused(cluster, request_id):
    error = _refusal(cluster, generation_pb2.GenerateRequest(text="hi", request_id=request_id))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in error.details()
    with pytest.raises(grpc.RpcError) as err:
        list(cluster.scheduler.Submit(scheduler_pb2.SubmitRequest(
            request_id=request_id, prompt_token_ids=[5, 6],
            params=common_pb2.SamplingParams(max_tokens=2, temperature=0.0)), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in err.value.details()


def test_a_server_side_abort_ends_the_stream_aborted_not_ok(cluster):
    call = cluster.generation.Generate(generation_pb2.GenerateRequest(
        request_id="victim", token_ids=generation_pb2.TokenIds(ids=[5, 6, 7]),
        params=common_pb2.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)),
        timeout=60)
    next(call)
    found = cluster.scheduler.Abort(scheduler_pb2.AbortRequest(request_id="victim"), timeout=10)
    assert found.found
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert cluster.all_blocks_free()


def test_no_prompt_text_or_token_ids_at_info(cluster, caplog):
    secret = "zebra-quartz-unicorn"
    ids = [431, 432, 433, 434, 435]
    with caplog.at_level(logging.INFO):
        list(cluster.generation.Generate(generation_pb2.GenerateRequest(
            text=secret, params=common_pb2.SamplingParams(max_tokens=3)), timeout=30))
        list(cluster.generation.Generate(generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=ids),
            params=common_pb2.SamplingParams(max_tokens=3)), timeout=30))
    info = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert secret not in info
    assert str(ids)[1:-1] not in info and "431" not in info


async def _idle_call_errors(server_opts: list) -> list:
    """Errors of a Health.Watch call left idle for 3 s, pinged every 200 ms by a client with
    ``channel_options``; [] when it is still open."""
    server = grpc.aio.server(options=server_opts)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=channel_options(keepalive_ms=200)) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            await call.read()  # SERVING; then nothing more while the call idles
            done, _ = await asyncio.wait([asyncio.ensure_future(call.read())], timeout=3)
            call.cancel()
            return [task.exception() for task in done]
    finally:
        await server.stop(0)


def test_an_idle_call_survives_the_keepalive_pings_clients_send():
    """``server_options`` accepts the pings ``channel_options`` sends, without limit, on an
    idle call (scaled down to 200 ms so that many intervals pass): no GOAWAY
    ``too_many_pings``."""
    assert asyncio.run(_idle_call_errors(server_options(keepalive_ms=200))) == []
