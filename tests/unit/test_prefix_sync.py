"""Prefix-index write-behind and restore, with the embedded store (no sockets): the block pool
rebuilds cached-but-free blocks, stale or foreign entries are refused, and a scheduler restart
over the same worker memory keeps its prefix hits with correct output, salted chains (cache
salts, per tenant) included: they come back under their salt only, in their LRU place."""

from __future__ import annotations

import asyncio

from kvstore.base import PrefixEntry, worker_key
from kvstore.memory import MemoryPrefixStore
from pagedserve.core.sampling import make_sampling_params, resolve_sampling_params
from protos.pagedserve.v1 import worker_pb2
from scheduler.block_hash import chain_root, hash_full_blocks
from scheduler.config import SchedulerConfig
from scheduler.engine import Engine
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.prefix_sync import PrefixSync, _lru_order
from scheduler.worker_handle import InProcessWorkerHandle
from tests.support.shadow_worker import ShadowWorker, reference_output


class InstanceShadowWorker(ShadowWorker):
    """The shadow worker with an instance id, as a real worker process reports one."""

    def __init__(self, instance_id: str = "i1", **kw) -> None:
        super().__init__(**kw)
        self.instance_id = instance_id

    def info(self) -> worker_pb2.WorkerInfo:
        info = super().info()
        info.instance_id = self.instance_id
        return info


def _params(max_tokens: int, prompt_len: int):
    p = make_sampling_params(max_tokens=max_tokens, ignore_eos=True)
    return resolve_sampling_params(p, num_prompt_tokens=prompt_len, max_model_len=4096,
                                   max_tokens_limit=4096)


async def _generate(engine: Engine, rid: str, prompt: list[int], max_tokens: int,
                    cache_salt: bytes = b"") -> list[int]:
    out: list[int] = []
    async for resp in engine.submit(rid, prompt, _params(max_tokens, len(prompt)),
                                    cache_salt=cache_salt):
        for o in resp.outputs:
            out.extend(o.token_ids)
    return out


def _chain(tokens: list[int], block_size: int, extra: bytes = b"shadow",
           root: bytes | None = None):
    hashes = hash_full_blocks(tokens, block_size, extra, root)
    return [(h, tuple(tokens[i * block_size:(i + 1) * block_size]), hashes[i - 1] if i else root)
            for i, h in enumerate(hashes)]


def test_restore_cached_marks_free_blocks_cached_in_lru_order_and_refuses_bad_entries():
    kv = KVCacheManager(num_gpu_blocks=8, num_cpu_blocks=0, block_size=2, hash_extra=b"shadow")
    chain = _chain([1, 2, 3, 4, 5, 6], 2)
    entries = [(h, 5 - i, toks, parent) for i, (h, toks, parent) in enumerate(chain)]
    bad_hash = (b"x" * 16, 0, (1, 2), None)  # does not re-compute
    duplicate = (chain[0][0] + b"", 5, (9, 9), None)  # claims block 5 too: both refused
    restored = kv.restore_cached([*entries[1:], bad_hash])
    assert restored == [chain[1][0], chain[2][0]]  # block 5's entry is absent: parent orphaned
    kv2 = KVCacheManager(num_gpu_blocks=8, num_cpu_blocks=0, block_size=2, hash_extra=b"shadow")
    assert kv2.restore_cached([*entries, duplicate]) == [chain[1][0], chain[2][0]]
    kv3 = KVCacheManager(num_gpu_blocks=8, num_cpu_blocks=0, block_size=2, hash_extra=b"shadow")
    assert len(kv3.restore_cached(entries)) == 3
    queue = [b.block_id for b in kv3.gpu.free_queue]
    assert queue[-3:] == [5, 4, 3] and kv3.gpu.num_free_blocks == 8
    assert kv3.lookup_prefix([1, 2, 3, 4, 5, 6, 7], 7).num_blocks == 3


def test_lru_order_puts_descendants_before_ancestors_and_orphans_first():
    chain = _chain(list(range(1, 9)), 2)
    entries = [PrefixEntry(h, i, toks, parent, stamp=10 + i)
               for i, (h, toks, parent) in enumerate(chain)]
    orphan = PrefixEntry(b"o" * 16, 7, (1, 1), b"p" * 16, stamp=99)
    order = [e[0] for e in _lru_order([orphan, *entries])]
    assert order == [orphan.block_hash, *[h for h, _, _ in reversed(chain)]]


def test_salted_chains_restore_under_their_salt_and_are_ordered_as_chains_not_orphans():
    root = chain_root(b"tenant-a")
    tokens = list(range(1, 9))
    salted, shared = _chain(tokens, 2, root=root), _chain(tokens, 2)
    entries = [PrefixEntry(h, i, toks, parent, stamp=10 + i)  # alice's chain: the most recent
               for i, (h, toks, parent) in enumerate(salted)]
    entries += [PrefixEntry(h, 4 + i, toks, parent, stamp=i)
                for i, (h, toks, parent) in enumerate(shared)]
    orphan = PrefixEntry(b"o" * 16, 7, (1, 1), b"p" * 16, stamp=99)
    order = [e[0] for e in _lru_order([*entries, orphan])]
    assert order == [orphan.block_hash, *[h for h, _, _ in reversed(shared)],
                     *[h for h, _, _ in reversed(salted)]]
    kv = KVCacheManager(num_gpu_blocks=8, num_cpu_blocks=0, block_size=2, hash_extra=b"shadow")
    assert len(kv.restore_cached(_lru_order(entries))) == 8  # salted hashes re-compute
    assert [b.block_id for b in kv.lookup_prefix(tokens + [9], 8, root).blocks] == [0, 1, 2, 3]
    assert [b.block_id for b in kv.lookup_prefix(tokens + [9], 8).blocks] == [4, 5, 6, 7]
    assert kv.lookup_prefix(tokens + [9], 8, chain_root(b"tenant-b")).num_blocks == 0
    assert [b.block_id for b in kv.gpu.free_queue][:4] == [7, 6, 5, 4]  # evicted first


def test_scheduler_restart_keeps_salted_prefix_hits_for_their_salt_only():
    async def main():
        store = MemoryPrefixStore()
        worker = InstanceShadowWorker(num_gpu_blocks=64, block_size=4)
        prefix = list(range(1, 41))  # 10 full blocks
        engine = Engine(SchedulerConfig(), [InProcessWorkerHandle(worker)],
                        prefix_sync=PrefixSync(store, flush_interval_s=0.01))
        await engine.start()
        await _generate(engine, "a", prefix + [7, 8], 5, cache_salt=b"tenant-a")
        await engine.stop()
        await engine.prefix_sync.close()

        engine = Engine(SchedulerConfig(), [InProcessWorkerHandle(worker)],
                        prefix_sync=PrefixSync(store))
        await engine.start()
        assert engine.prefix_sync.num_restored_blocks >= 10
        for rid, salt in (("shared", b""), ("bob", b"tenant-b")):
            assert await _generate(engine, rid, prefix + [9], 5, salt) == reference_output(
                prefix + [9], 5, None)
            assert engine.stats().prefix_hit_tokens == 0
        assert await _generate(engine, "alice", prefix + [9], 5, b"tenant-a") == (
            reference_output(prefix + [9], 5, None))
        assert engine.stats().prefix_hit_tokens == 40
        await engine.stop()
        await engine.prefix_sync.close()
    asyncio.run(main())


def test_scheduler_restart_keeps_prefix_hits_with_correct_output():
    async def main():
        store = MemoryPrefixStore()
        worker = InstanceShadowWorker(num_gpu_blocks=64, block_size=4)
        prefix = list(range(1, 41))  # 10 full blocks

        engine = Engine(SchedulerConfig(), [InProcessWorkerHandle(worker)],
                        prefix_sync=PrefixSync(store, flush_interval_s=0.01))
        await engine.start()
        engine.prefix_sync.start()
        assert await _generate(engine, "a", prefix + [7, 8], 5) == reference_output(
            prefix + [7, 8], 5, None)
        await engine.stop()
        await engine.prefix_sync.close()
        assert await store.is_clean(worker_key("shadow", "i1"))

        engine = Engine(SchedulerConfig(), [InProcessWorkerHandle(worker)],
                        prefix_sync=PrefixSync(store))
        await engine.start()
        assert engine.prefix_sync.num_restored_blocks >= 10
        assert not await store.is_clean(worker_key("shadow", "i1"))
        before = worker.num_computed_tokens
        assert await _generate(engine, "b", prefix + [9], 5) == reference_output(
            prefix + [9], 5, None)
        assert engine.stats().prefix_hit_tokens == 40
        assert worker.num_computed_tokens - before == 1 + 4
        await engine.stop()
        await engine.prefix_sync.close()
    asyncio.run(main())


def test_unclean_index_and_other_instances_are_not_restored():
    async def main():
        store = MemoryPrefixStore()
        worker = InstanceShadowWorker(instance_id="i2", num_gpu_blocks=64, block_size=4)
        chain = _chain(list(range(1, 9)), 4)
        old = [PrefixEntry(h, i, toks, parent) for i, (h, toks, parent) in enumerate(chain)]
        await store.put(worker_key("shadow", "i1"), old)  # an earlier process of the worker
        await store.mark_clean(worker_key("shadow", "i1"), True)
        await store.put(worker_key("shadow", "i2"), old)  # a scheduler that died: not clean
        engine = Engine(SchedulerConfig(), [InProcessWorkerHandle(worker)],
                        prefix_sync=PrefixSync(store, flush_interval_s=0.01))
        await engine.start()
        assert engine.prefix_sync.num_restored_blocks == 0
        assert await store.load(worker_key("shadow", "i1")) == []  # pruned
        assert await engine.prefix_sync.flush()
        assert await store.load(worker_key("shadow", "i2")) == []  # replaced by the live view
        await engine.stop()
        await engine.prefix_sync.close()
    asyncio.run(main())


def test_rebuilt_worker_metadata_replaces_the_index_and_a_new_instance_drops_the_old_key():
    async def main():
        store = MemoryPrefixStore()
        worker = InstanceShadowWorker(num_gpu_blocks=64, block_size=4)
        sync = PrefixSync(store)
        engine = Engine(SchedulerConfig(), [InProcessWorkerHandle(worker)], prefix_sync=sync)
        await engine.start()
        await _generate(engine, "a", list(range(1, 21)), 2)
        assert await sync.flush()
        assert len(await store.load(worker_key("shadow", "i1"))) == 5
        ws = engine.workers[0]
        worker.instance_id = "i2"  # the worker restarted; the engine reconnected to it
        ws.info = await ws.handle.info()
        ws.core = engine._new_core(ws.handle.name, ws.info)
        sync.record(ws)
        assert await sync.flush()
        assert await store.load(worker_key("shadow", "i1")) == []
        await _generate(engine, "b", list(range(1, 21)), 2)
        assert await sync.flush()
        assert len(await store.load(worker_key("shadow", "i2"))) == 5
        await engine.stop()
        await sync.close()
    asyncio.run(main())
