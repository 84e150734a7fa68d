"""Write-behind of each worker's prefix-cache view to the kvstore, and its restore at start.

The scheduler's in-memory block pool is the truth; the kvstore follows it in batches::

    step loop ──record(ws)──▶ pending {hash: entry | DELETE}   (no I/O, after every step)
                                   │ every flush_interval_s (and on close)
                                   ▼
                         store.apply([...])   one pipelined round trip for every worker

A pending op is keyed by block hash and reflects the pool *at record time* (a hash that is
cached now is put with its current block, otherwise deleted), so the order of ``stored`` and
``removed`` events inside one drain does not matter.

When the store fails, the scheduler keeps serving from memory: ``healthy`` turns False, errors
are counted, and the flush retries with backoff until the store answers again. Pending ops are
then replaced by one full resync per worker (DEL + the live view, atomically): a failed or timed
out pipeline may or may not have landed, and a Redis without persistence comes back empty, so
replaying the ops would not be enough. While a resync is due nothing accumulates, so memory stays
bounded however long the outage; ``max_pending`` bounds the ops between two healthy flushes.

Restore is only trusted from a *clean* key: one that the previous scheduler sealed on close
after its last flush succeeded. A scheduler that died may have let the worker overwrite a block
whose eviction never reached the store, so a key that is not clean is not restored (the next
flush replaces it with the live view). ``restore`` unseals the key before the first step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvstore.base import PrefixEntry, PrefixStore, StoreBatch, worker_key
from scheduler.block_hash import is_chain_root
from scheduler.kv_cache_manager import KVCacheManager

logger = logging.getLogger(__name__)

_DELETE = None  # a pending op that removes the hash


@dataclass
class _WorkerSync:
    """What the store knows of one worker, relative to the live pool."""

    ws: Any  # scheduler.engine.WorkerState
    key: str | None  # None: the worker reports no instance id, nothing is persisted
    kv: KVCacheManager
    pending: dict[bytes, PrefixEntry | None] = field(default_factory=dict)
    parents: dict[bytes, bytes | None] = field(default_factory=dict)
    needs_resync: bool = False
    needs_prune: bool = False  # other instances' keys may remain (the store was down at restore)
    stale_keys: set[str] = field(default_factory=set)  # earlier keys of this worker to delete


class KvstoreOpTimer(Protocol):
    """Times one kvstore call and counts its failure (``scheduler.metrics.SchedulerMetrics``)."""

    def kvstore_op(self, op: str) -> contextlib.AbstractContextManager[None]: ...


class PrefixSync:
    """Owns the write-behind state of every worker and the flush task.

    Exposed for metrics: ``healthy`` (last store call succeeded), ``num_errors`` (failed store
    calls), ``num_dropped_ops`` (pending ops given up for a resync), ``num_pending``,
    ``num_flushes``, ``num_restored_blocks``."""

    def __init__(self, store: PrefixStore, flush_interval_s: float = 0.15,
                 max_pending: int = 100_000, max_backoff_s: float = 5.0,
                 metrics: KvstoreOpTimer | None = None) -> None:
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.max_backoff_s = max_backoff_s
        self.metrics = metrics  # scheduler.metrics.SchedulerMetrics, when metrics are on
        self.healthy = True
        self.num_errors = 0
        self.num_dropped_ops = 0
        self.num_flushes = 0
        self.num_restored_blocks = 0
        self._workers: dict[int, _WorkerSync] = {}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()

    @property
    def num_pending(self) -> int:
        return sum(len(w.pending) for w in self._workers.values())

    # ---- restore (awaited by Engine.start, before the worker's first step) -------------------
    async def restore(self, ws: Any) -> int:
        """Rebuilds the cached-but-free blocks of ``ws`` from the store; returns how many."""
        state = self._state(ws)
        if state.key is None:
            logger.warning("worker %s reports no instance id: its prefix index is not persisted",
                           ws.handle.name)
            return 0
        try:
            with self._op("restore"):
                await self.store.prune_instances(ws.info.worker_id, ws.info.instance_id)
                clean = await self.store.is_clean(state.key)
                entries = await self.store.load(state.key)
                await self.store.mark_clean(state.key, False)  # this scheduler owns it now
        except Exception as exc:  # noqa: BLE001 -- any store failure: serve without the index
            self._failed("restore", exc)
            state.needs_resync = state.needs_prune = True
            return 0
        self._set_healthy()
        if not clean:
            # The last scheduler died between index writes: trust exactly the entries whose
            # block the worker still vouches for (same hash, not written since).
            vouched = {b.block_id: b.block_hash for b in ws.info.cached_blocks}
            total = len(entries)
            entries = [e for e in entries if vouched.get(e.block_id) == e.block_hash]
            if len(entries) < total:
                state.needs_resync = True  # replace what was dropped with the live view
            if total:  # (a first start has nothing to confirm)
                logger.warning("prefix index of worker %s was not closed cleanly: %d of %d "
                               "entries confirmed by the worker", ws.handle.name, len(entries),
                               total)
        restored = ws.kv.restore_cached(_lru_order(entries))
        for entry in entries:
            state.parents[entry.block_hash] = entry.parent_hash
        if len(restored) < len(entries):
            state.needs_resync = True  # drop the entries that were refused
        self._resync_parents(state)
        self.num_restored_blocks += len(restored)
        logger.info("worker %s: restored %d cached blocks from the prefix index (%d refused)",
                    ws.handle.name, len(restored), len(entries) - len(restored))
        return len(restored)

    # ---- record (after every step; no I/O) ---------------------------------------------------
    def record(self, ws: Any) -> None:
        state = self._state(ws)
        if ws.kv is not state.kv:
            self._rebind(state, ws)
        events = ws.kv.drain_events()
        for block_hash, _, _, parent in events.stored:
            state.parents[block_hash] = parent
        if state.key is None or state.needs_resync:
            if events.removed:
                self._resync_parents(state)
            if state.needs_resync and (events.stored or events.removed):
                self._wake.set()  # the next flush writes the whole live view
            return
        now = time.time_ns()
        pool = ws.kv.gpu
        for block_hash in (*events.removed, *(s[0] for s in events.stored)):
            block = pool.cached.get(block_hash)
            if block is None or block.token_ids is None:
                state.pending[block_hash] = _DELETE
                state.parents.pop(block_hash, None)
            else:
                state.pending[block_hash] = PrefixEntry(
                    block_hash, block.block_id, block.token_ids,
                    state.parents.get(block_hash), now)
        if len(state.pending) > self.max_pending:
            self._drop_pending(state)
        if state.pending:
            self._wake.set()

    # ---- flushing ----------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the background flush task (on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="prefix-sync")

    async def flush(self, seal: bool = False) -> bool:
        """Writes every pending op (and resyncs) in one round trip. ``seal``: write each worker's
        full view with exact LRU stamps and mark it clean (the last flush before close)."""
        async with self._flush_lock:
            states = [s for s in self._workers.values() if s.key is not None or s.stale_keys]
            batches, commits = [], []
            for state in states:
                batch, commit = self._batch(state, full=seal)
                batches.extend(batch)
                commits.append(commit)
            if not batches:
                return True
            try:
                with self._op("flush"):
                    await self.store.apply(batches)
                    if seal:
                        for state in states:
                            if state.key is not None:
                                await self.store.mark_clean(state.key, True)
            except Exception as exc:  # noqa: BLE001 -- any store failure: retry, then resync
                self._failed("flush", exc)
                for state in states:  # whether any of it landed is unknown, and the store
                    self._drop_pending(state, log=False)  # may come back empty: resync
                return False
            for commit in commits:
                commit()
            self.num_flushes += 1
            self._set_healthy()
            await self._prune(states)
            return True

    async def _prune(self, states: list[_WorkerSync]) -> None:
        for state in states:
            if state.needs_prune and state.key is not None:
                with contextlib.suppress(Exception):
                    await self.store.prune_instances(state.ws.info.worker_id,
                                                     state.ws.info.instance_id)
                    state.needs_prune = False

    async def close(self) -> None:
        """Stops the flush task, seals every worker's key (after the engine stopped, so every
        block is free and the free queue gives the exact LRU order) and closes the store."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for state in list(self._workers.values()):
            self.record(state.ws)
        if not await self.flush(seal=True):
            logger.warning("prefix index not sealed: the next scheduler starts cold")
        await self.store.close()

    async def _run(self) -> None:
        delay = self.flush_interval_s
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(delay, 1.0))
            self._wake.clear()
            await asyncio.sleep(delay)  # gather a batch (or back off)
            ok = await self.flush()
            delay = self.flush_interval_s if ok else min(max(delay * 2, 0.25), self.max_backoff_s)

    # ---- internals ---------------------------------------------------------------------------
    def _state(self, ws: Any) -> _WorkerSync:
        state = self._workers.get(id(ws))
        if state is None:
            state = _WorkerSync(ws=ws, key=_key_of(ws), kv=ws.kv)
            self._workers[id(ws)] = state
        return state

    def _rebind(self, state: _WorkerSync, ws: Any) -> None:
        """The engine rebuilt this worker's metadata (failed worker, reconnect): the old view is
        gone without eviction events, and the instance may be new. Start over with a resync."""
        new_key = _key_of(ws)
        if state.key is not None and state.key != new_key:
            state.stale_keys.add(state.key)
        state.key, state.kv = new_key, ws.kv
        state.pending.clear()
        state.parents.clear()
        state.needs_resync = True

    def _drop_pending(self, state: _WorkerSync, log: bool = True) -> None:
        self.num_dropped_ops += len(state.pending)
        if log:
            logger.warning("worker %s: %d prefix-index ops pending; dropping them, a full "
                           "resync follows", state.ws.handle.name, len(state.pending))
        state.pending.clear()
        state.needs_resync = True

    def _batch(self, state: _WorkerSync, full: bool) -> tuple[list[StoreBatch], Any]:
        """This worker's batches and a callback that marks them written (on success only)."""
        batches = [StoreBatch(k, replace=True) for k in sorted(state.stale_keys)]
        stale = set(state.stale_keys)
        resync = full or state.needs_resync
        if state.key is not None and resync:
            batches.append(StoreBatch(state.key, put=self._snapshot(state), replace=True))
        elif state.key is not None and state.pending:
            puts = [e for e in state.pending.values() if e is not None]
            removes = [h for h, e in state.pending.items() if e is None]
            batches.append(StoreBatch(state.key, put=puts, remove=removes))
        sent = dict(state.pending)

        def commit() -> None:
            state.stale_keys -= stale
            if resync:
                state.needs_resync = False
            for block_hash, op in sent.items():  # ops recorded during the write stay pending
                if block_hash in state.pending and state.pending[block_hash] is op:
                    del state.pending[block_hash]
        if resync:
            state.pending.clear()  # the snapshot covers them; newer ops will follow it
        return batches, commit

    def _snapshot(self, state: _WorkerSync) -> list[PrefixEntry]:
        """Every cached block of the live pool; stamps follow the free queue (LRU head first),
        blocks in use count as most recent."""
        pool = state.kv.gpu
        cached_free = [b for b in pool.free_queue if b.block_hash is not None]
        in_use = [b for b in pool.cached.values() if b.ref_cnt > 0]
        base = time.time_ns() - len(cached_free) - len(in_use)
        return [
            PrefixEntry(b.block_hash, b.block_id, b.token_ids, state.parents.get(b.block_hash),
                        base + i)
            for i, b in enumerate([*cached_free, *in_use])
            if b.block_hash is not None and b.token_ids is not None
        ]

    @staticmethod
    def _resync_parents(state: _WorkerSync) -> None:
        cached = state.kv.gpu.cached
        for block_hash in [h for h in state.parents if h not in cached]:
            del state.parents[block_hash]

    @contextlib.contextmanager
    def _op(self, op: str) -> Iterator[None]:
        if self.metrics is None:
            yield
            return
        with self.metrics.kvstore_op(op):
            yield

    def _failed(self, op: str, exc: Exception) -> None:
        self.num_errors += 1
        if self.healthy:
            logger.warning("kvstore %s failed (%s: %s): serving from the in-memory prefix view, "
                           "retrying with backoff", op, type(exc).__name__, exc)
        self.healthy = False

    def _set_healthy(self) -> None:
        if not self.healthy:
            logger.warning("kvstore reachable again: prefix index caught up")
        self.healthy = True


def _key_of(ws: Any) -> str | None:
    instance_id = getattr(ws.info, "instance_id", "")
    return worker_key(ws.info.worker_id, instance_id) if instance_id else None


def _lru_order(entries: list[PrefixEntry]) -> Iterator[tuple[bytes, int, tuple[int, ...],
                                                               bytes | None]]:
    """Least recently used first, descendants before their ancestors: a chain is as recent as
    its most recent block, and within it the deepest block goes first (it would have been freed
    first, tail-first). A chain starts at a block whose parent is a root (none, or a cache salt's:
    ``block_hash.is_chain_root``); entries whose parent is not stored can never be hit: first of
    all."""
    by_hash = {e.block_hash: e for e in entries}
    depth: dict[bytes, int] = {}
    recency: dict[bytes, int] = {e.block_hash: e.stamp for e in entries}

    def depth_of(h: bytes) -> None:
        path: list[bytes] = []
        cur = h
        while cur not in depth:
            parent = by_hash[cur].parent_hash
            if is_chain_root(parent):
                depth[cur] = 0
            elif parent not in by_hash or parent in path or parent == cur:
                depth[cur] = -1  # orphan (or a corrupt cycle): never reachable by a lookup
            else:
                path.append(cur)
                cur = parent
        for node in reversed(path):
            parent = by_hash[node].parent_hash
            assert parent is not None, "only nodes with a parent are put on the path"
            parent_depth = depth[parent]
            depth[node] = -1 if parent_depth < 0 else parent_depth + 1

    for e in sorted(entries, key=lambda e: -e.stamp):  # propagate recency to the ancestors
        parent = e.parent_hash
        while parent in by_hash and recency[parent] < recency[e.block_hash]:
            recency[parent] = recency[e.block_hash]
            parent = by_hash[parent].parent_hash
    for e in entries:
        depth_of(e.block_hash)
    ordered = sorted(entries, key=lambda e: (depth[e.block_hash] >= 0, recency[e.block_hash],
                                             -depth[e.block_hash]))
    for e in ordered:
        yield e.block_hash, e.block_id, e.token_ids, e.parent_hash
