"""The kvstore interface and the URL that picks an implementation.

Entries are grouped per *worker key*: one worker process start (``worker_key(worker_id,
instance_id)``). KV memory belongs to one process, so entries written for an earlier instance of
a worker (which lost its memory when it restarted) can never match a later one, and
``prune_instances`` deletes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote


@dataclass(frozen=True)
class PrefixEntry:
    """Physical block ``block_id`` holds the KV of ``token_ids`` after the chain ``parent_hash``.
    ``stamp`` orders entries by recency (larger = used more recently); it is a hint for LRU order
    on restore, never for correctness."""

    block_hash: bytes
    block_id: int
    token_ids: tuple[int, ...]
    parent_hash: bytes | None = None
    stamp: int = 0


@dataclass(frozen=True)
class StoreBatch:
    """Changes for one worker key, applied atomically with every other batch of the same call.

    ``replace``: drop everything stored for the key first (a full resync). ``put`` entries win
    over ``remove`` hashes. Any write also clears the key's *clean* mark (see ``mark_clean``)."""

    worker_key: str
    put: Sequence[PrefixEntry] = ()
    remove: Sequence[bytes] = ()
    replace: bool = False


def worker_key(worker_id: str, instance_id: str) -> str:
    """``<worker_id>:<instance_id>``, each part percent-quoted so that neither ``:`` nor glob
    characters in a worker id can make one worker's key match another's pattern."""
    return f"{quote(worker_id, safe='')}:{quote(instance_id, safe='')}"


class PrefixStore(Protocol):
    """Per worker key, which physical block holds which content hash."""

    async def put(self, worker_key: str, entries: Sequence[PrefixEntry]) -> None: ...

    async def remove(self, worker_key: str, block_hashes: Sequence[bytes]) -> None: ...

    async def apply(self, batches: Sequence[StoreBatch]) -> None:
        """Every batch in one round trip (Redis: one MULTI/EXEC pipeline)."""

    async def load(self, worker_key: str) -> list[PrefixEntry]: ...

    async def is_clean(self, worker_key: str) -> bool:
        """Whether the key was sealed with ``mark_clean(key, True)`` and not written since: the
        scheduler that wrote it flushed everything and closed, so no entry can be stale."""

    async def mark_clean(self, worker_key: str, clean: bool) -> None: ...

    async def prune_instances(self, worker_id: str, keep_instance_id: str) -> int:
        """Deletes the keys of every other instance of ``worker_id``; returns how many."""

    async def workers_holding(self, block_hash: bytes) -> list[str]: ...

    async def clear(self, worker_key: str) -> None: ...

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
