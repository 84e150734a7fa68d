"""API keys and per-key rate limits at a real router (gRPC and HTTP on 127.0.0.1:0) in front of
the scripted fake Scheduler of ``test_router_grpc``: a missing or wrong key is refused on every
route but health, a key over its limit gets RESOURCE_EXHAUSTED with a retry hint while another
key is served, no key ever reaches a log line or a metric, and with prefix-cache isolation each
key's requests (resubmissions included) carry a salt of their own to the scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from pagedserve.client import AsyncClient
from pagedserve.core import file_watch
from pagedserve.core.grpc_util import aio_channel
from protos.pagedserve.v1 import common_pb2, scheduler_pb2_grpc
from router import generation
from router.cache_salt import CacheIsolation
from router.config import RouterConfig, ServerConfig
from router.rate_limit import RateLimitConfig
from router.server import RouterServer, start_router
from router.tokenizer import Tokenizer
from tests.integration import test_router_grpc as fakes

tokenizer = fakes.tokenizer  # the module-scoped fixture
ALICE = "alice-0123456789abcdef0123"
BOB = "bob-fedcba9876543210fedcba"
SLOW = 0.001  # per second: nothing refills while a test runs, however slow the machine


@contextlib.asynccontextmanager
async def serving(tokenizer: Tokenizer, tmp_path: Any, limits: RateLimitConfig | None = None,
                  fake: fakes.FakeScheduler | None = None,
                  isolation: CacheIsolation = CacheIsolation.NONE
                  ) -> AsyncIterator[RouterServer]:
    """A router with two keys: ``alice`` from the key file, ``bob`` from the environment
    entries (bare, so its id is derived)."""
    key_file = tmp_path / "keys"
    key_file.write_text(f"# team keys\nalice:{ALICE}\n\n")
    fake = fake or fakes.FakeScheduler(
        outputs=fakes.token_outputs([7, 8, 9], common_pb2.FINISH_REASON_LENGTH))
    scheduler = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(fake, scheduler)
    scheduler_port = scheduler.add_insecure_port("127.0.0.1:0")
    await scheduler.start()
    cfg = RouterConfig(scheduler_address=f"127.0.0.1:{scheduler_port}",
                       server=ServerConfig(host="127.0.0.1", port=0, grace_s=0.1, http_port=0),
                       startup_timeout_s=5, api_key_file=str(key_file), api_keys=(BOB,),
                       rate_limits=limits or RateLimitConfig(),
                       prefix_cache_isolation=isolation)
    router = await start_router(cfg, tokenizer)
    try:
        yield router
    finally:
        await router.stop()
        await scheduler.stop(0)


async def _grpc_generate(router: RouterServer, key: str | None) -> tuple[str, str | None]:
    """(status code name, retry-after) of a Generate call with ``key``."""
    async with AsyncClient(f"127.0.0.1:{router.port}", api_key=key) as client:
        try:
            await client.generate_text("Hi", max_tokens=3, timeout=10)
        except grpc.aio.AioRpcError as exc:
            trailing = dict(exc.trailing_metadata() or ())
            return exc.code().name, trailing.get("retry-after")
    return "OK", None


async def _grpc_code(router: RouterServer, key: str | None, call: str) -> str:
    async with AsyncClient(f"127.0.0.1:{router.port}", api_key=key) as client:
        try:
            if call == "model_info":
                await client.model_info(timeout=10)
            else:
                await client.tokenize("Hi", timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    return "OK"


async def _http(router: RouterServer, method: str, path: str, key: str | None,
                body: Any = None) -> tuple[int, Any, dict[str, str]]:
    assert router.http is not None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(router.http.url) as session, \
            session.request(method, path, json=body, headers=headers) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


COMPLETION = {"prompt": "Hi", "max_tokens": 3}


def test_missing_or_wrong_key_is_unauthenticated_over_grpc_and_http(
        tokenizer: Tokenizer, tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> dict[str, Any]:
        async with serving(tokenizer, tmp_path) as router:
            out: dict[str, Any] = {
                "grpc none": await _grpc_generate(router, None),
                "grpc wrong": await _grpc_generate(router, "x" * 24),
                "grpc alice": await _grpc_generate(router, ALICE),
                "grpc bob": await _grpc_generate(router, BOB),
                "info none": await _grpc_code(router, None, "model_info"),
                "info bob": await _grpc_code(router, BOB, "model_info"),
                "tokenize none": await _grpc_code(router, None, "tokenize"),
                "tokenize alice": await _grpc_code(router, ALICE, "tokenize"),
                "http none": await _http(router, "POST", "/v1/completions", None, COMPLETION),
                "http wrong": await _http(router, "POST", "/v1/completions", BOB + "x",
                                          COMPLETION),
                "http alice": await _http(router, "POST", "/v1/completions", ALICE, COMPLETION),
                "models none": await _http(router, "GET", "/v1/models", None),
                "health none": await _http(router, "GET", "/health", None),
            }
            async with aio_channel(f"127.0.0.1:{router.port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10)
            out["grpc health"] = reply.status
            assert router.metrics is not None
            out["metrics"] = generate_latest(router.metrics.registry).decode()
        return out

    out = asyncio.run(main())
    assert out["grpc none"] == out["grpc wrong"] == ("UNAUTHENTICATED", None)
    assert out["grpc alice"] == out["grpc bob"] == ("OK", None)
    assert out["info none"] == out["tokenize none"] == "UNAUTHENTICATED"
    assert out["info bob"] == out["tokenize alice"] == "OK"
    for name in ("http none", "http wrong", "models none"):
        status, body, headers = out[name]
        assert status == 401, name
        assert body["error"]["code"] == "unauthenticated" and body["error"]["message"], name
        assert headers["WWW-Authenticate"] == "Bearer"
    assert out["http alice"][0] == 200 and out["http alice"][1]["usage"]["completion_tokens"] == 3
    assert out["health none"][0] == 200
    assert out["grpc health"] == health_pb2.HealthCheckResponse.SERVING
    metrics = out["metrics"]
    assert 'pagedserve_router_key_requests_total{key_id="alice"} 2.0' in metrics
    assert 'key_id="key-' in metrics  # bob's derived id
    text = "\n".join(r.getMessage() for r in caplog.records) + metrics
    assert "alice" in text  # the id is logged...
    assert ALICE not in text and BOB not in text and ALICE[6:] not in text  # ...never the key


def test_a_key_over_its_request_rate_is_refused_while_another_is_served(
        tokenizer: Tokenizer, tmp_path: Any) -> None:
    limits = RateLimitConfig(requests_per_s=SLOW, request_burst=2)

    async def main() -> dict[str, Any]:
        async with serving(tokenizer, tmp_path, limits) as router:
            out = {"alice": [await _grpc_generate(router, ALICE) for _ in range(3)],
                   "bob": await _grpc_generate(router, BOB),
                   "alice http": await _http(router, "POST", "/v1/completions", ALICE,
                                             COMPLETION)}
            assert router.metrics is not None
            out["limited"] = router.metrics.registry.get_sample_value(
                "pagedserve_router_key_rate_limited_total", {"key_id": "alice",
                                                             "limit": "requests"})
        return out

    out = asyncio.run(main())
    assert out["alice"][:2] == [("OK", None)] * 2
    code, retry = out["alice"][2]
    assert code == "RESOURCE_EXHAUSTED" and retry is not None and int(retry) >= 1
    assert out["bob"] == ("OK", None)
    status, body, headers = out["alice http"]
    assert status == 429 and body["error"]["type"] and int(headers["Retry-After"]) >= 1
    assert out["limited"] == 2


def test_a_key_in_token_debt_waits_while_another_is_served(
        tokenizer: Tokenizer, tmp_path: Any) -> None:
    """Prompt and generated tokens are charged; once over its burst the key is refused."""
    limits = RateLimitConfig(tokens_per_s=SLOW, token_burst=2)  # one request: 1 + 3 tokens

    async def main() -> list[tuple[str, str | None]]:
        async with serving(tokenizer, tmp_path, limits) as router:
            return [await _grpc_generate(router, ALICE), await _grpc_generate(router, ALICE),
                    await _grpc_generate(router, BOB)]

    first, second, bob = asyncio.run(main())
    assert first == ("OK", None)  # admitted with a full bucket; its tokens put alice in debt
    assert second[0] == "RESOURCE_EXHAUSTED" and second[1] is not None
    assert bob == ("OK", None)


def test_load_test_harness_sends_its_api_key_over_both_backends(
        tokenizer: Tokenizer, tmp_path: Any) -> None:
    from pagedserve.loadtest.backends import Credentials, SamplingConfig, make_backend
    from pagedserve.loadtest.datasets import RequestSpec

    spec = RequestSpec(index=0, max_tokens=3, prompt_text="Hi")

    async def main() -> dict[str, str]:
        async with serving(tokenizer, tmp_path) as router:
            assert router.http is not None
            out = {}
            for backend in ("grpc", "openai"):
                for name, key in (("key", ALICE), ("no key", None)):
                    client = make_backend(backend, f"127.0.0.1:{router.port}", router.http.url,
                                          SamplingConfig(model="smollm2"),
                                          credentials=Credentials(api_key=key))
                    try:
                        out[f"{backend} {name}"] = (await client.generate(spec, 10, 0.0)).status
                    finally:
                        await client.close()
        return out

    out = asyncio.run(main())
    assert out == {"grpc key": "OK", "grpc no key": "UNAUTHENTICATED",
                   "openai key": "OK", "openai no key": "HTTP_401"}


def test_with_isolation_each_key_and_client_salt_reaches_the_scheduler_as_its_own_salt(
        tokenizer: Tokenizer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every submit of a request, resubmissions after UNAVAILABLE included, carries its salt;
    the salt is an opaque digest, neither the key nor its id."""
    fake = fakes.FakeScheduler(error=grpc.StatusCode.UNAVAILABLE)
    monkeypatch.setattr(generation, "MAX_CONTINUATIONS", 1)  # one resubmission, one backoff

    async def main() -> list[tuple[str, str]]:
        async with serving(tokenizer, tmp_path, fake=fake,
                           isolation=CacheIsolation.API_KEY) as router:
            calls = [("alice", ALICE, ""), ("bob", BOB, ""), ("alice", ALICE, "x"),
                     ("alice http", ALICE, "x")]
            for name, key, salt in calls:
                if name.endswith("http"):
                    await _http(router, "POST", "/v1/completions", key,
                                {**COMPLETION, "cache_salt": salt})
                    continue
                async with AsyncClient(f"127.0.0.1:{router.port}", api_key=key) as client:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await client.generate_text("Hi", max_tokens=3, cache_salt=salt,
                                                   timeout=30)
            return [(name, salt) for name, _, salt in calls]

    calls = asyncio.run(main())
    by_request: dict[str, list[bytes]] = {}
    for request in fake.requests:
        by_request.setdefault(request.request_id, []).append(request.cache_salt)
    assert len(by_request) == len(calls)
    assert all(len(salts) > 1 and len(set(salts)) == 1  # resubmitted with the same salt
               for salts in by_request.values())
    alice, bob, alice_x, alice_x_http = [salts[0] for salts in by_request.values()]
    assert len({alice, bob, alice_x}) == 3 and alice_x_http == alice_x
    for salt in (alice, bob, alice_x):
        assert salt and all(s.encode() not in salt for s in (ALICE, BOB, "alice"))


def test_a_revoked_key_is_refused_and_a_new_one_served_without_a_restart(
        tokenizer: Tokenizer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key file is edited while the router runs (as a Kubernetes Secret update lands)."""
    monkeypatch.setattr(file_watch, "CHECK_INTERVAL_S", 0.0)
    carol = "carol-00112233445566778899"

    async def main() -> dict[str, Any]:
        async with serving(tokenizer, tmp_path) as router:
            out: dict[str, Any] = {"alice before": await _grpc_generate(router, ALICE)}
            staged = tmp_path / "keys.new"
            staged.write_text(f"carol:{carol}\n")
            staged.replace(tmp_path / "keys")  # alice revoked, carol added
            out["alice grpc"] = await _grpc_generate(router, ALICE)
            out["alice http"] = (await _http(router, "POST", "/v1/completions", ALICE,
                                             COMPLETION))[0]
            out["carol grpc"] = await _grpc_generate(router, carol)
            out["carol http"] = (await _http(router, "POST", "/v1/completions", carol,
                                             COMPLETION))[0]
            out["bob"] = await _grpc_generate(router, BOB)  # from the environment: stays
            assert router.metrics is not None
            out["metrics"] = generate_latest(router.metrics.registry).decode()
        return out

    out = asyncio.run(main())
    assert out["alice before"] == out["carol grpc"] == out["bob"] == ("OK", None)
    assert out["alice grpc"] == ("UNAUTHENTICATED", None) and out["alice http"] == 401
    assert out["carol http"] == 200
    assert 'key_id="carol"' in out["metrics"] and carol not in out["metrics"]


def test_a_keys_own_limits_from_the_key_file_apply_and_follow_its_edits(
        tokenizer: Tokenizer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No router-wide limit; alice's entry sets her own, bob (no options) has none."""
    monkeypatch.setattr(file_watch, "CHECK_INTERVAL_S", 0.0)

    def keys(options: str) -> None:
        staged = tmp_path / "keys.new"
        staged.write_text(f"alice:{ALICE} {options}\n")
        staged.replace(tmp_path / "keys")

    async def main() -> dict[str, Any]:
        async with serving(tokenizer, tmp_path) as router:
            keys(f"rps={SLOW} burst=1")
            out: dict[str, Any] = {
                "alice": [await _grpc_generate(router, ALICE) for _ in range(2)],
                "bob": [await _grpc_generate(router, BOB) for _ in range(3)]}
            keys("rps=1000")
            await asyncio.sleep(0.05)  # refills at 1000 a second now
            out["alice after"] = await _grpc_generate(router, ALICE)
        return out

    out = asyncio.run(main())
    assert out["alice"][0] == ("OK", None)
    code, retry_after = out["alice"][1]
    assert code == "RESOURCE_EXHAUSTED" and retry_after is not None and float(retry_after) > 60
    assert out["bob"] == [("OK", None)] * 3
    assert out["alice after"] == ("OK", None)
