"""Redis prefix index: survives a scheduler restart and can be read by other schedulers/routers.

Layout (one Redis hash per worker process start)::

    pagedserve:prefix:<worker_id>:<instance_id>      (parts percent-quoted, see worker_key)
        <16-byte block hash>  ->  packed entry (_pack)
        "~clean"              ->  "1" while sealed (the writer flushed everything and closed)

Every write goes through ``apply``: all batches in one MULTI/EXEC pipeline, so one round trip per
flush and a full resync (DEL + HSET) is never seen half done. Writes also drop ``~clean``.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from typing import cast
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvstore.base import PrefixEntry, StoreBatch
from kvstore.base import worker_key as make_worker_key

KEY_PREFIX = "pagedserve:prefix:"
CLEAN_FIELD = b"~clean"
_HEADER = struct.Struct("<BIQB")  # version, block id, stamp, parent hash length
_VERSION = 1


def _pack(entry: PrefixEntry) -> bytes:
    parent = entry.parent_hash or b""
    header = _HEADER.pack(_VERSION, entry.block_id, entry.stamp, len(parent))
    return header + parent + array("i", entry.token_ids).tobytes()


def _unpack(block_hash: bytes, data: bytes) -> PrefixEntry:
    version, block_id, stamp, parent_len = _HEADER.unpack_from(data)
    if version != _VERSION:
        raise ValueError(f"unknown prefix entry version {version}")
    start = _HEADER.size
    parent = data[start : start + parent_len] or None
    tokens = array("i")
    tokens.frombytes(data[start + parent_len :])
    return PrefixEntry(block_hash, block_id, tuple(tokens), parent, stamp)


class RedisPrefixStore:
    """``PrefixStore`` over redis-py's asyncio client. Calls fail fast (no client-side retries):
    the caller (``scheduler.prefix_sync.PrefixSync``) owns retry, backoff and resync."""

    def __init__(self, url: str, timeout_s: float = 2.0) -> None:
        self.url = url
        self._client = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
        )

    @staticmethod
    def key(worker_key: str) -> str:
        return KEY_PREFIX + worker_key

    async def put(self, worker_key: str, entries: Sequence[PrefixEntry]) -> None:
        await self.apply([StoreBatch(worker_key, put=entries)])

    async def remove(self, worker_key: str, block_hashes: Sequence[bytes]) -> None:
        await self.apply([StoreBatch(worker_key, remove=block_hashes)])

    async def apply(self, batches: Sequence[StoreBatch]) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            for batch in batches:
                key = self.key(batch.worker_key)
                if batch.replace:
                    pipe.delete(key)
                put_hashes = {e.block_hash for e in batch.put}
                removed = [h for h in batch.remove if h not in put_hashes]
                if removed:
                    pipe.hdel(key, *removed)
                if batch.put:
                    pipe.hset(key, mapping={e.block_hash: _pack(e) for e in batch.put})
                if not batch.replace:
                    pipe.hdel(key, CLEAN_FIELD)
            if len(pipe):
                await pipe.execute()

    async def load(self, worker_key: str) -> list[PrefixEntry]:
        raw = cast("dict[bytes, bytes]", await self._client.hgetall(self.key(worker_key)))
        return [_unpack(h, v) for h, v in raw.items() if h != CLEAN_FIELD]

    async def is_clean(self, worker_key: str) -> bool:
        return await self._client.hget(self.key(worker_key), CLEAN_FIELD) == b"1"

    async def mark_clean(self, worker_key: str, clean: bool) -> None:
        if clean:
            await self._client.hset(self.key(worker_key), CLEAN_FIELD, b"1")
        else:
            await self._client.hdel(self.key(worker_key), CLEAN_FIELD)

    async def prune_instances(self, worker_id: str, keep_instance_id: str) -> int:
        keep = self.key(make_worker_key(worker_id, keep_instance_id)).encode()
        pattern = f"{KEY_PREFIX}{quote(worker_id, safe='')}:*"
        stale = [k async for k in self._client.scan_iter(match=pattern, count=500) if k != keep]
        if stale:
            await self._client.delete(*stale)
        return len(stale)

    async def workers_holding(self, block_hash: bytes) -> list[str]:
        keys = [k async for k in self._client.scan_iter(match=f"{KEY_PREFIX}*", count=500)]
        if not keys:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hexists(key, block_hash)
            found = await pipe.execute()
        return [k.decode()[len(KEY_PREFIX):] for k, hit in zip(keys, found, strict=True) if hit]

    async def clear(self, worker_key: str) -> None:
        await self._client.delete(self.key(worker_key))

    async def close(self) -> None:
        await self._client.aclose()
