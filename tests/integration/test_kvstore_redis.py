"""RedisPrefixStore against a real redis-server: round trips, one pipeline per flush, instance
keys, and PrefixSync over Redis across a scheduler restart and a Redis outage."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from kvstore.base import PrefixEntry, StoreBatch, open_store, worker_key
from kvstore.redis_store import RedisPrefixStore
from scheduler.config import SchedulerConfig
from scheduler.engine import Engine
from scheduler.prefix_sync import PrefixSync
from scheduler.worker_handle import InProcessWorkerHandle
from tests.support.redis_server import RedisServer, running_redis
from tests.support.shadow_worker import reference_output
from tests.unit.test_prefix_sync import InstanceShadowWorker, _generate


@pytest.fixture
def redis_server():
    yield from running_redis()


def _entry(i: int, parent: bytes | None = None) -> PrefixEntry:
    return PrefixEntry(bytes([i]) * 16, i, (i, i + 1, 70000, -1), parent, stamp=1000 + i)


def _num_exec(server: RedisServer) -> int:
    stats = redis.Redis(port=server.port).info("commandstats")
    return int(stats.get("cmdstat_exec", {}).get("calls", 0))


def test_put_remove_load_clear_round_trip(redis_server):
    async def main():
        store = open_store(redis_server.url)
        assert isinstance(store, RedisPrefixStore)
        key = worker_key("w:0", "inst")
        entries = [_entry(1), _entry(2, _entry(1).block_hash), _entry(3, _entry(2).block_hash)]
        await store.put(key, entries)
        assert sorted(await store.load(key), key=lambda e: e.block_id) == entries
        await store.remove(key, [_entry(2).block_hash])
        assert {e.block_id for e in await store.load(key)} == {1, 3}
        assert await store.workers_holding(_entry(3).block_hash) == [key]
        await store.mark_clean(key, True)
        assert await store.is_clean(key)
        await store.put(key, [_entry(4)])  # any write unseals
        assert not await store.is_clean(key)
        await store.clear(key)
        assert await store.load(key) == []
        await store.close()
    asyncio.run(main())


def test_a_flush_of_many_workers_is_one_pipelined_transaction(redis_server):
    async def main():
        store = RedisPrefixStore(redis_server.url)
        keys = [worker_key(f"w{i}", "x") for i in range(3)]
        await store.put(keys[0], [_entry(9)])
        before = _num_exec(redis_server)
        await store.apply([
            StoreBatch(keys[0], put=[_entry(1)], remove=[_entry(9).block_hash]),
            StoreBatch(keys[1], put=[_entry(2), _entry(3)]),
            StoreBatch(keys[2], put=[_entry(4)], replace=True),
        ])
        assert _num_exec(redis_server) == before + 1
        assert [e.block_id for e in await store.load(keys[0])] == [1]
        assert len(await store.load(keys[1])) == 2
        await store.close()
    asyncio.run(main())


def test_prune_deletes_other_instances_of_the_same_worker_only(redis_server):
    async def main():
        store = RedisPrefixStore(redis_server.url)
        for wid, inst in [("w", "old"), ("w", "new"), ("w:x", "old"), ("w*", "old")]:
            await store.put(worker_key(wid, inst), [_entry(1)])
        assert await store.prune_instances("w", "new") == 1
        assert await store.load(worker_key("w", "old")) == []
        for wid, inst in [("w", "new"), ("w:x", "old"), ("w*", "old")]:
            assert len(await store.load(worker_key(wid, inst))) == 1
        await store.close()
    asyncio.run(main())


def _engine(worker, url: str, **sync_kw) -> Engine:
    return Engine(SchedulerConfig(kvstore_url=url), [InProcessWorkerHandle(worker)],
                  prefix_sync=PrefixSync(open_store(url), **sync_kw))


def test_engine_restart_over_the_same_worker_keeps_prefix_hits(redis_server):
    async def main():
        worker = InstanceShadowWorker(num_gpu_blocks=128, block_size=4)
        prefix = [1 + (7 * i) % 97 for i in range(80)]  # 20 full blocks
        engine = _engine(worker, redis_server.url, flush_interval_s=0.05)
        await engine.start()
        engine.prefix_sync.start()
        assert await _generate(engine, "a", prefix + [5], 6) == reference_output(
            prefix + [5], 6, None)

        async def written() -> bool:  # written behind while running, not only at close
            return len(await engine.prefix_sync.store.load(worker_key("shadow", "i1"))) >= 20

        await _wait_for(written)
        await engine.stop()
        await engine.prefix_sync.close()

        engine = _engine(worker, redis_server.url)  # a new scheduler, same worker memory
        await engine.start()
        engine.prefix_sync.start()
        assert engine.prefix_sync.num_restored_blocks >= 20
        before = worker.num_computed_tokens
        out = await _generate(engine, "b", prefix + [6, 7], 6)
        assert out == reference_output(prefix + [6, 7], 6, None)  # shadow checks KV content
        assert engine.stats().prefix_hit_tokens == 80
        assert worker.num_computed_tokens - before == 2 + 5
        await engine.stop()
        await engine.prefix_sync.close()
    asyncio.run(main())


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def test_redis_outage_keeps_serving_reports_unhealthy_and_catches_up(redis_server):
    async def main():
        worker = InstanceShadowWorker(num_gpu_blocks=128, block_size=4)
        engine = _engine(worker, redis_server.url, flush_interval_s=0.05, max_backoff_s=0.3)
        sync = engine.prefix_sync
        key = worker_key("shadow", "i1")
        await engine.start()
        sync.start()
        redis_server.stop()
        prompts = {f"r{i}": [i + 1] * 4 + list(range(10, 30)) for i in range(4)}
        outs = await asyncio.gather(*(_generate(engine, r, p, 4) for r, p in prompts.items()))
        for (rid, prompt), out in zip(prompts.items(), outs, strict=True):
            assert out == reference_output(prompt, 4, None), rid
        await _wait_for(lambda: _false(lambda: sync.healthy))
        assert sync.num_errors > 0
        assert engine.workers[0].kv.gpu.num_cached_free_blocks >= 20  # in-memory view intact

        redis_server.start()  # same port, empty (no persistence): a resync refills it
        check = RedisPrefixStore(redis_server.url)

        async def caught_up() -> bool:
            return sync.healthy and len(await check.load(key)) == len(
                engine.workers[0].kv.gpu.cached)
        await _wait_for(caught_up)
        await check.close()
        await engine.stop()
        await sync.close()
    asyncio.run(main())


async def _false(get) -> bool:
    return not get()
