"""The kvstore interface and the URL that picks an implementation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PrefixEntry:
    block_hash: bytes
    block_id: int
    token_ids: tuple[int, ...]
    parent_hash: bytes | None = None


class PrefixStore(Protocol):
    """Per worker, which physical block holds which content hash. Worker ids are unique per
    worker *process*, so entries of a worker that restarted (and lost its memory) never match."""

    async def put(self, worker_id: str, entries: Sequence[PrefixEntry]) -> None: ...

    async def remove(self, worker_id: str, block_hashes: Sequence[bytes]) -> None: ...

    async def load(self, worker_id: str) -> list[PrefixEntry]: ...

    async def workers_holding(self, block_hash: bytes) -> list[str]: ...

    async def clear(self, worker_id: str) -> None: ...

    async def close(self) -> None: ...


def open_store(url: str) -> PrefixStore:
    """``memory://`` (embedded default) or ``redis://HOST:PORT/DB``."""
    if url.startswith("memory://"):
        from kvstore.memory import MemoryPrefixStore

        return MemoryPrefixStore()
    if url.startswith("redis://"):
        from kvstore.redis_store import RedisPrefixStore

        return RedisPrefixStore(url)
    raise ValueError(f"unknown kvstore URL {url!r}: use memory:// or redis://HOST:PORT/DB")
