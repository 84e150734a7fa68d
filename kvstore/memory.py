"""In-memory prefix index: the embedded default (lives and dies with the scheduler process)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from kvstore.base import PrefixEntry, StoreBatch
from kvstore.base import worker_key as make_worker_key


class MemoryPrefixStore:
    def __init__(self) -> None:
        self._by_worker: dict[str, dict[bytes, PrefixEntry]] = defaultdict(dict)
        self._clean: set[str] = set()

    async def put(self, worker_key: str, entries: Sequence[PrefixEntry]) -> None:
        await self.apply([StoreBatch(worker_key, put=entries)])

    async def remove(self, worker_key: str, block_hashes: Sequence[bytes]) -> None:
        await self.apply([StoreBatch(worker_key, remove=block_hashes)])

    async def apply(self, batches: Sequence[StoreBatch]) -> None:
        for batch in batches:
            if batch.replace:
                self._by_worker.pop(batch.worker_key, None)
            table = self._by_worker[batch.worker_key]
            for block_hash in batch.remove:
                table.pop(block_hash, None)
            for entry in batch.put:
                table[entry.block_hash] = entry
            self._clean.discard(batch.worker_key)

    async def load(self, worker_key: str) -> list[PrefixEntry]:
        return list(self._by_worker.get(worker_key, {}).values())

    async def is_clean(self, worker_key: str) -> bool:
        return worker_key in self._clean

    async def mark_clean(self, worker_key: str, clean: bool) -> None:
        if clean:
            self._clean.add(worker_key)
        else:
            self._clean.discard(worker_key)

    async def prune_instances(self, worker_id: str, keep_instance_id: str) -> int:
        keep = make_worker_key(worker_id, keep_instance_id)
        prefix = keep[: keep.index(":") + 1]
        stale = [k for k in self._by_worker if k.startswith(prefix) and k != keep]
        for key in stale:
            await self.clear(key)
        return len(stale)

    async def workers_holding(self, block_hash: bytes) -> list[str]:
        return [w for w, table in self._by_worker.items() if block_hash in table]

    async def clear(self, worker_key: str) -> None:
        self._by_worker.pop(worker_key, None)
        self._clean.discard(worker_key)

    async def close(self) -> None:
        return None
