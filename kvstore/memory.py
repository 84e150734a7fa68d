"""In-memory prefix index: the embedded default (lives and dies with the scheduler process)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from kvstore.base import PrefixEntry


class MemoryPrefixStore:
    def __init__(self) -> None:
        self._by_worker: dict[str, dict[bytes, PrefixEntry]] = defaultdict(dict)

    async def put(self, worker_id: str, entries: Sequence[PrefixEntry]) -> None:
        table = self._by_worker[worker_id]
        for entry in entries:
            table[entry.block_hash] = entry

    async def remove(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        table = self._by_worker[worker_id]
        for block_hash in block_hashes:
            table.pop(block_hash, None)

    async def load(self, worker_id: str) -> list[PrefixEntry]:
        return list(self._by_worker.get(worker_id, {}).values())

    async def workers_holding(self, block_hash: bytes) -> list[str]:
        return [w for w, table in self._by_worker.items() if block_hash in table]

    async def clear(self, worker_id: str) -> None:
        self._by_worker.pop(worker_id, None)

    async def close(self) -> None:
        return None
