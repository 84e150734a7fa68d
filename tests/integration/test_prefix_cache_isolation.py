"""Issue 15's prefix-cache side channel, end to end (router with two API keys, scheduler, a
worker with the tiny model): with ``--prefix-cache-isolation api-key`` one key's
``usage.cached_tokens`` never reveals what another key sent, while its own repeats still hit the
cache; without it every key shares, as before. A client's ``cache_salt`` (gRPC and HTTP) splits
one key's requests further and cannot name another key's partition. Greedy output is the same
whatever the partition. No public surface (responses, metrics, INFO logs) shows a block hash."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from protos.pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from router.cache_salt import CacheIsolation
from router.config import RouterConfig
from tests.support.cluster import ClusterThread
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_factory import cpu_worker_config

BLOCK_SIZE = 16
NUM_PREFIX_BLOCKS = 6
CACHED = NUM_PREFIX_BLOCKS * BLOCK_SIZE
ALICE = "alice-0123456789abcdef0123"
BOB = "bob-fedcba9876543210fedcba"


def _cluster(isolation: CacheIsolation) -> Iterator[ClusterThread]:
    c = ClusterThread([cpu_worker_config(tiny_llama_dir(), block_size=BLOCK_SIZE,
                                         num_gpu_blocks=256)],
                      router_config=RouterConfig(api_keys=(f"alice:{ALICE}", f"bob:{BOB}"),
                                                 prefix_cache_isolation=isolation),
                      http=True, metrics=True)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def isolated() -> Iterator[ClusterThread]:
    yield from _cluster(CacheIsolation.API_KEY)


@pytest.fixture(scope="module")
def shared() -> Iterator[ClusterThread]:
    yield from _cluster(CacheIsolation.NONE)


def _prompt(seed: int) -> list[int]:
    """``NUM_PREFIX_BLOCKS`` full blocks and a few more tokens; a new one for every test."""
    return [3 + (seed * 31 + 11 * i) % 400 for i in range(CACHED + 3)]


def _generate(c: ClusterThread, key: str, ids: list[int], cache_salt: str = ""
              ) -> tuple[list[int], int, list[bytes]]:
    """(output tokens, usage.cached_tokens, every response message serialized) over gRPC."""
    request = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=ids), cache_salt=cache_salt,
        params=common_pb2.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    stub = generation_pb2_grpc.GenerationStub(c.channel)
    messages = list(stub.Generate(request, timeout=120,
                                  metadata=(("authorization", f"Bearer {key}"),)))
    tokens = [t for m in messages for t in m.token_ids]
    cached = [m.usage.cached_tokens for m in messages if m.HasField("usage")]
    assert len(cached) == 1
    return tokens, cached[0], [m.SerializeToString() for m in messages]


def _http_completion(c: ClusterThread, key: str, ids: list[int], cache_salt: str | None = None
                     ) -> tuple[dict[str, Any], bytes]:
    body: dict[str, Any] = {"prompt": ids, "max_tokens": 6, "temperature": 0,
                            "ignore_eos": True}
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    request = urllib.request.Request(
        f"{c.cluster.http_url}/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        raw = response.read()
    return json.loads(raw), raw


def _cached_tokens(completion: dict[str, Any]) -> int:
    return int(completion["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_with_api_key_isolation_another_key_never_sees_a_cached_prefix_but_its_owner_does(
        isolated: ClusterThread) -> None:
    prompt = _prompt(1)
    first, alice_first, _ = _generate(isolated, ALICE, prompt)
    bob_out, bob_first, _ = _generate(isolated, BOB, prompt)
    alice_out, alice_again, _ = _generate(isolated, ALICE, prompt)
    bob_again_out, bob_again, _ = _generate(isolated, BOB, prompt)
    assert (alice_first, bob_first) == (0, 0)  # bob learns nothing of alice's prompt
    assert (alice_again, bob_again) == (CACHED, CACHED)  # each key shares with itself
    assert first == bob_out == alice_out == bob_again_out
    assert isolated.all_blocks_free()


def test_a_client_cache_salt_splits_one_key_and_cannot_reach_another_keys_partition(
        isolated: ClusterThread) -> None:
    prompt = _prompt(2)
    plain, _, _ = _generate(isolated, ALICE, prompt)
    salted, alice_salted, _ = _generate(isolated, ALICE, prompt, cache_salt="project-x")
    assert alice_salted == 0 and salted == plain
    http, _ = _http_completion(isolated, ALICE, prompt, cache_salt="project-x")
    assert _cached_tokens(http) == CACHED  # HTTP's cache_salt is the same partition
    _, bob_salted, _ = _generate(isolated, BOB, prompt, cache_salt="project-x")
    assert bob_salted == 0  # the same client salt under another key: another partition
    _, alice_plain_again, _ = _generate(isolated, ALICE, prompt)
    assert alice_plain_again == CACHED


def test_without_isolation_every_key_shares_the_cache_unless_a_client_salts(
        shared: ClusterThread) -> None:
    prompt = _prompt(3)
    first, alice_first, _ = _generate(shared, ALICE, prompt)
    bob_out, bob_cached, _ = _generate(shared, BOB, prompt)
    assert (alice_first, bob_cached) == (0, CACHED)  # today's behaviour
    salted, alice_salted, _ = _generate(shared, ALICE, prompt, cache_salt="mine")
    http, _ = _http_completion(shared, BOB, prompt, cache_salt="mine")
    assert alice_salted == 0 and _cached_tokens(http) == CACHED  # a shared secret shares
    assert first == bob_out == salted
    assert [c["text"] for c in http["choices"]] == [
        _http_completion(shared, ALICE, prompt)[0]["choices"][0]["text"]]


def test_an_invalid_cache_salt_is_refused_naming_the_field(isolated: ClusterThread) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _generate(isolated, ALICE, _prompt(4), cache_salt="x" * 300)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "cache_salt" in (info.value.details() or "")
    with pytest.raises(urllib.error.HTTPError) as http_info:
        _http_completion(isolated, ALICE, _prompt(4), cache_salt="x" * 300)
    assert http_info.value.code == 400
    assert json.loads(http_info.value.read())["error"]["param"] == "cache_salt"


def test_no_public_surface_shows_a_block_hash(isolated: ClusterThread,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    prompt = _prompt(5)
    seen: list[bytes] = []
    for key in (ALICE, BOB, ALICE):
        seen.extend(_generate(isolated, key, prompt)[2])
        seen.append(_http_completion(isolated, key, prompt)[1])
    for url in isolated.cluster.metrics_urls.values():
        with urllib.request.urlopen(url, timeout=30) as response:
            seen.append(response.read())
    hashes = set(isolated.cluster.engine.workers[0].kv.gpu.cached)
    assert len(hashes) >= 2 * NUM_PREFIX_BLOCKS  # alice's chain and bob's
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    for block_hash in hashes:
        assert not any(block_hash in blob or block_hash.hex().encode() in blob for blob in seen)
        assert block_hash.hex() not in logged
