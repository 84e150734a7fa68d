"""A scheduler restart over real gRPC with the tiny model and Redis: the workers keep their KV
memory, the new scheduler restores the prefix index from Redis, and a request sharing the prefix
hits the cache with the same output as a scheduler without prefix caching. Salted chains (a
client's or a tenant's cache salt) come back too, for their salt only."""

from __future__ import annotations

import grpc
import pytest

from protos.pagedserve.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    scheduler_pb2_grpc,
)
from router.config import RouterConfig
from router.config import ServerConfig as RouterServerConfig
from router.server import start_router
from router.tokenizer import load_tokenizer
from scheduler.config import CacheConfig, SchedulerConfig, ServerConfig
from scheduler.server import build_server
from scheduler.worker_handle import GrpcWorkerHandle
from tests.support.cluster import ClusterThread
from tests.support.redis_server import running_redis
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_factory import cpu_worker_config

BLOCK_SIZE = 16


@pytest.fixture
def redis_server():
    yield from running_redis()


@pytest.fixture
def cluster(redis_server):
    c = ClusterThread([cpu_worker_config(tiny_llama_dir(), block_size=BLOCK_SIZE,
                                         num_gpu_blocks=128)],
                      SchedulerConfig(kvstore_url=redis_server.url))
    yield c
    c.stop()


def _restart_scheduler(c: ClusterThread, config: SchedulerConfig, crash: bool = False) -> None:
    """Stops router and scheduler (``crash``: without sealing the prefix index, as a killed
    process would leave it); starts new ones over the same worker servers."""
    lc = c.cluster
    addresses = tuple(f"127.0.0.1:{w.port}" for w in lc.workers)
    config = SchedulerConfig(batching=config.batching, cache=config.cache,
                             server=ServerConfig(host="127.0.0.1", port=0),
                             worker_addresses=addresses, kvstore_url=config.kvstore_url)

    async def restart():
        await lc.router.stop()
        if crash:
            old = lc.scheduler
            await old.engine.prefix_sync.flush()  # the index as of some write before the crash
            old.engine.prefix_sync.flush = _never  # ... and nothing after it
            await old.server.stop(0)
            await old.engine.stop()
            if old.observer is not None:
                await old.observer.stop()
        else:
            await lc.scheduler.stop(grace=1.0)
        lc.scheduler = await build_server(config, [GrpcWorkerHandle(a) for a in addresses])
        rconf = RouterConfig(model=str(lc.model_path),
                             scheduler_address=f"127.0.0.1:{lc.scheduler.port}",
                             server=RouterServerConfig(host="127.0.0.1", port=0, grace_s=1.0))
        lc.router = await start_router(rconf, load_tokenizer(lc.model_path))
    c.channel.close()
    c.sched_channel.close()
    c.run(restart())
    c.channel = grpc.insecure_channel(lc.router_address)
    c.generation = generation_pb2_grpc.GenerationStub(c.channel)
    c.sched_channel = grpc.insecure_channel(lc.scheduler_address)
    c.scheduler = scheduler_pb2_grpc.SchedulerStub(c.sched_channel)


def _generate(c: ClusterThread, ids: list[int], max_tokens: int = 8,
              cache_salt: str = "") -> list[int]:
    req = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=ids), cache_salt=cache_salt,
        params=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                         ignore_eos=True))
    return [t for m in c.generation.Generate(req, timeout=120) if m.index == 0
            for t in m.token_ids]


def test_prefix_hits_survive_a_scheduler_restart_with_identical_output(cluster, redis_server):
    prefix = [3 + (11 * i) % 400 for i in range(6 * BLOCK_SIZE)]
    first = _generate(cluster, prefix + [7, 8, 9])
    assert cluster.stats().prefix_hit_tokens == 0

    redis_config = SchedulerConfig(kvstore_url=redis_server.url)
    _restart_scheduler(cluster, redis_config)
    assert cluster.cluster.engine.prefix_sync.num_restored_blocks >= 6
    second = _generate(cluster, prefix + [10, 11])
    assert cluster.stats().prefix_hit_tokens == 6 * BLOCK_SIZE

    _restart_scheduler(cluster, SchedulerConfig(cache=CacheConfig(enable_prefix_caching=False),
                                                kvstore_url=redis_server.url))
    assert _generate(cluster, prefix + [10, 11]) == second
    assert _generate(cluster, prefix + [7, 8, 9]) == first
    assert cluster.stats().prefix_hit_tokens == 0


async def _never(seal: bool = False) -> bool:
    return False


def test_after_a_scheduler_crash_only_blocks_the_worker_vouches_for_are_restored(
        cluster, redis_server):
    prefix = [5 + (13 * i) % 400 for i in range(6 * BLOCK_SIZE)]
    first = _generate(cluster, prefix + [7, 8, 9])
    worker = cluster.cluster.workers[0].worker
    vouched = dict(worker.block_hashes)
    assert len(vouched) >= 6, "the worker should hold the published prefix blocks"
    # Since the last index write, something overwrote one prefix block (here: by hand).
    engine = cluster.cluster.engine
    cached = engine.workers[0].kv.gpu.cached
    overwritten = next(b for b, h in vouched.items()
                       if cached.get(h) is not None
                       and cached[h].token_ids[0] == prefix[3 * BLOCK_SIZE])
    del worker.block_hashes[overwritten]
    for layer_k, layer_v in worker.cache.gpu_cache:
        layer_k[overwritten].normal_()
        layer_v[overwritten].normal_()

    _restart_scheduler(cluster, SchedulerConfig(kvstore_url=redis_server.url), crash=True)
    restored = cluster.cluster.engine.prefix_sync.num_restored_blocks
    assert 3 <= restored < len(vouched) + 1
    second = _generate(cluster, prefix + [7, 8, 9])
    assert second == first  # the corrupted block was not trusted: recomputed, same output
    assert cluster.stats().prefix_hit_tokens == 3 * BLOCK_SIZE  # the chain stops before it


def test_salted_prefix_hits_survive_a_restart_and_a_crash_for_their_salt_only(
        cluster, redis_server):
    prefix = [7 + (17 * i) % 400 for i in range(6 * BLOCK_SIZE)]
    first = _generate(cluster, prefix + [7, 8, 9], cache_salt="tenant-a")
    worker = cluster.cluster.workers[0].worker
    salted = set(cluster.cluster.engine.workers[0].kv.gpu.cached)
    assert len(salted) >= 6 and salted <= set(worker.block_hashes.values())  # worker vouches
    redis_config = SchedulerConfig(kvstore_url=redis_server.url)
    # (each salt asks once: its request caches a chain of its own)
    for crash, others in ((False, ("tenant-b",)), (True, ("", "tenant-c"))):
        _restart_scheduler(cluster, redis_config, crash=crash)
        assert cluster.cluster.engine.prefix_sync.num_restored_blocks >= 6
        assert salted <= set(cluster.cluster.engine.workers[0].kv.gpu.cached)
        for salt in others:  # the restored chain is not theirs
            assert _generate(cluster, prefix + [7, 8, 9], cache_salt=salt) == first
            assert cluster.stats().prefix_hit_tokens == 0
        assert _generate(cluster, prefix + [7, 8, 9], cache_salt="tenant-a") == first
        assert cluster.stats().prefix_hit_tokens == 6 * BLOCK_SIZE
