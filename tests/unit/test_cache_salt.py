"""Prefix-cache partitions (issue 15's side channel): a request's cache salt seeds the hash chain
of its blocks, so requests with different salts never share a block and requests with the same
salt share exactly as unsalted ones do. Checked on the synchronous engine core with the
content-checking worker double, through forks, recompute preemption, continuations and moves to
another worker, and in placement; plus the router's salt derivation and configuration, and the
public API, which has no field that could carry a block hash."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from pagedserve.core.errors import InvalidArgument
from protos.pagedserve.v1 import generation_pb2
from router.cache_salt import (
    MAX_CACHE_SALT_BYTES,
    CacheIsolation,
    check_cache_salt,
    request_cache_salt,
)
from router.config import RouterConfig
from router.openai_protocol import parse_chat_request, parse_completion_request
from scheduler.block_hash import chain_root, hash_full_blocks, is_chain_root
from scheduler.engine_core import CoreRequest, EngineCore
from scheduler.placement import choose_worker
from tests.support.engine_core import resolved_params, shadow_core
from tests.support.shadow_worker import ShadowWorker, reference_output

BLOCK_SIZE = 4
PROMPT = list(range(1, 18))  # 4 full blocks and one token
NUM_CACHEABLE = 16  # the last prompt token is always computed


def _run(core: EngineCore, worker: ShadowWorker) -> None:
    for _ in range(500):
        if core.step(worker) is None:
            break
    assert not core.has_work


def _serve(core: EngineCore, worker: ShadowWorker, rid: str, salt: bytes,
           prompt: list[int] = PROMPT, max_tokens: int = 4,
           generated: list[int] | None = None) -> CoreRequest:
    req = core.add_request(rid, prompt, resolved_params(prompt, max_tokens=max_tokens),
                           generated or [], cache_salt=salt)
    _run(core, worker)
    return req


def _cached(req: CoreRequest) -> int:
    return req.group.seqs[0].num_cached_tokens


def test_different_salts_never_share_blocks_and_the_same_salt_shares_as_unsalted_requests_do():
    worker = ShadowWorker(num_gpu_blocks=128, block_size=BLOCK_SIZE)
    core = shadow_core(worker)
    reference = reference_output(PROMPT, 4, None)
    first_a = _serve(core, worker, "a1", b"tenant-a")
    other_b = _serve(core, worker, "b1", b"tenant-b")
    unsalted = _serve(core, worker, "u1", b"")
    again_a = _serve(core, worker, "a2", b"tenant-a")
    again_b = _serve(core, worker, "b2", b"tenant-b")
    again_unsalted = _serve(core, worker, "u2", b"")
    assert [_cached(r) for r in (first_a, other_b, unsalted)] == [0, 0, 0]
    assert [_cached(r) for r in (again_a, again_b, again_unsalted)] == [NUM_CACHEABLE] * 3
    for req in (first_a, other_b, unsalted, again_a, again_b, again_unsalted):
        assert req.group.seqs[0].output_token_ids == reference  # the salt changes no output
    gpu = core.kv.gpu
    assert gpu.num_free_blocks == gpu.num_blocks  # (cached, free)
    assert len(gpu.cached) == 3 * (NUM_CACHEABLE + 4) // BLOCK_SIZE  # three separate chains


def test_salted_chains_are_not_found_without_their_salt_and_hash_from_the_salted_root():
    worker = ShadowWorker(num_gpu_blocks=128, block_size=BLOCK_SIZE)
    core = shadow_core(worker)
    _serve(core, worker, "a", b"tenant-a")
    kv = core.kv
    root = chain_root(b"tenant-a")
    assert kv.lookup_prefix(PROMPT, NUM_CACHEABLE).num_blocks == 0
    assert kv.lookup_prefix(PROMPT, NUM_CACHEABLE, chain_root(b"tenant-b")).num_blocks == 0
    hit = kv.lookup_prefix(PROMPT, NUM_CACHEABLE, root)
    assert hit.hashes == hash_full_blocks(PROMPT[:NUM_CACHEABLE], BLOCK_SIZE, b"shadow", root)
    assert root is not None and is_chain_root(root) and is_chain_root(None)
    assert not any(is_chain_root(h) for h in hit.hashes)
    assert chain_root(b"") is None


def test_forks_recomputes_and_continuations_keep_the_salt():
    worker = ShadowWorker(num_gpu_blocks=128, block_size=BLOCK_SIZE)
    core = shadow_core(worker, budget=8)
    salt = b"tenant-a"
    prompt = PROMPT[:3]  # no full block: the samples start their chains from the root
    req = core.add_request("n", prompt, resolved_params(prompt, max_tokens=9, n=3, temperature=1.0,
                                                 seed=7), cache_salt=salt)
    _run(core, worker)
    assert len(req.group.seqs) == 3
    assert {s.hash_root for s in req.group.seqs} == {chain_root(salt)}
    for seq in req.group.seqs:  # every sample's blocks are in the salted chain only
        tokens = seq.token_ids
        assert core.kv.lookup_prefix(tokens, len(tokens)).num_blocks == 0
        assert core.kv.lookup_prefix(tokens, len(tokens), chain_root(salt)).num_blocks == 2

    # A continuation (the router's resubmission: prompt + tokens already streamed) with the
    # same salt reuses the salted blocks; under another salt it recomputes everything.
    first = _serve(core, worker, "c0", salt, max_tokens=6)
    streamed = first.group.seqs[0].output_token_ids[:3]
    same = _serve(core, worker, "c1", salt, max_tokens=6, generated=streamed)
    other = _serve(core, worker, "c2", b"tenant-b", max_tokens=6, generated=streamed)
    assert _cached(same) == 4 * BLOCK_SIZE  # 20 tokens: every full block but the last token
    assert _cached(other) == 0
    assert same.group.seqs[0].output_token_ids == first.group.seqs[0].output_token_ids
    assert other.group.seqs[0].output_token_ids == first.group.seqs[0].output_token_ids

    # A recompute keeps the root: the evacuated request finds its salted prefix elsewhere.
    worker_b = ShadowWorker(num_gpu_blocks=128, block_size=BLOCK_SIZE, name="b")
    core_b = shadow_core(worker_b, name="b")
    _serve(core_b, worker_b, "warm", salt)
    moving = core.add_request("m", PROMPT, resolved_params(PROMPT, max_tokens=4), cache_salt=salt)
    core.schedule()  # planned on core, then its worker fails before the step runs
    [moved] = core.evacuate()
    assert moved is moving and moving.group.seqs[0].hash_root == chain_root(salt)
    core_b.add(moving)
    _run(core_b, worker_b)
    assert _cached(moving) == NUM_CACHEABLE
    assert moving.group.seqs[0].output_token_ids == reference_output(PROMPT, 4, None)


def test_placement_follows_the_prefix_of_the_requests_own_salt():
    workers = [ShadowWorker(num_gpu_blocks=128, block_size=BLOCK_SIZE, name=n) for n in "ab"]
    cores = [shadow_core(w, name=w.name) for w in workers]
    _serve(cores[0], workers[0], "shared", b"")  # the unsalted prefix on a
    _serve(cores[1], workers[1], "alice", b"tenant-a")  # alice's on b
    for salt, expected in ((b"", "a"), (b"tenant-a", "b")):
        probe = cores[0].add_request(f"probe-{salt!r}", PROMPT,
                                     resolved_params(PROMPT, max_tokens=4), cache_salt=salt)
        core, reason = choose_worker(cores, probe.group.seqs[0], 8)
        assert (core.name, reason) == (expected, "prefix")
        cores[0].abort(probe.request_id)
    bob = cores[0].add_request("bob", PROMPT, resolved_params(PROMPT, max_tokens=4),
                               cache_salt=b"tenant-b")
    assert choose_worker(cores, bob.group.seqs[0], 8)[1] == "least_loaded"


def test_router_salt_names_the_tenant_and_the_client_salt_never_spells_another_tenant():
    none, by_key = CacheIsolation.NONE, CacheIsolation.API_KEY
    assert request_cache_salt(none, "alice", "") == b""  # today's shared cache
    assert request_cache_salt(none, "alice", "s") == request_cache_salt(none, "bob", "s")
    alice = request_cache_salt(by_key, "alice", "")
    assert alice and alice != request_cache_salt(by_key, "bob", "")
    assert alice == request_cache_salt(by_key, "alice", "")  # stable across routers
    assert request_cache_salt(by_key, "alice", "s") != alice
    assert request_cache_salt(by_key, "alice", "s") != request_cache_salt(by_key, "bob", "s")
    assert request_cache_salt(by_key, "bob", "alice") != alice  # no salt picks a tenant
    assert request_cache_salt(by_key, "bob", "") != request_cache_salt(none, "", "bob")
    check_cache_salt("x" * MAX_CACHE_SALT_BYTES)
    with pytest.raises(InvalidArgument, match="cache_salt"):
        check_cache_salt("é" * MAX_CACHE_SALT_BYTES)


def test_api_key_isolation_needs_keys_and_http_takes_cache_salt_as_a_string():
    with pytest.raises(ValueError, match="needs API keys"):
        RouterConfig(prefix_cache_isolation=CacheIsolation.API_KEY)
    RouterConfig(prefix_cache_isolation=CacheIsolation.API_KEY, api_keys=("k" * 16,))
    parsed = parse_completion_request({"prompt": ["a", "b"], "cache_salt": "s"}, "r")
    assert [r.cache_salt for r in parsed.requests] == ["s", "s"]
    chat = parse_chat_request({"messages": [{"role": "user", "content": "hi"}],
                               "cache_salt": "s"}, "r")
    assert chat.requests[0].cache_salt == "s"
    with pytest.raises(InvalidArgument, match="cache_salt"):
        parse_completion_request({"prompt": "x", "cache_salt": 5}, "r")


def _messages(descriptor: Descriptor, seen: set[str]) -> set[str]:
    if descriptor.full_name not in seen:
        seen.add(descriptor.full_name)
        for f in descriptor.fields:
            if f.message_type is not None:
                _messages(f.message_type, seen)
    return seen


def test_the_public_generation_api_has_no_field_that_could_carry_a_block_hash():
    """Hashes stay between scheduler, worker and kvstore: nothing the router answers has a
    bytes field or a field named for hashes (a salt goes in, never out)."""
    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    seen: set[str] = set()
    for method in service.methods:
        _messages(method.output_type, seen)
    pool = generation_pb2.DESCRIPTOR.pool
    for name in seen:
        for f in pool.FindMessageTypeByName(name).fields:
            assert f.type != FieldDescriptor.TYPE_BYTES and "hash" not in f.name, f.full_name
