"""Request placement across workers: each worker is an independent replica with its own pool.

A new request goes to the worker holding its longest cached prefix among those with room for it;
ties (including "no prefix anywhere") go to the least loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from scheduler.kv_cache_manager import KVCacheManager

if TYPE_CHECKING:
    from scheduler.policy import WorkerScheduler


class _Worker(Protocol):
    @property
    def kv(self) -> KVCacheManager: ...

    @property
    def sched(self) -> WorkerScheduler: ...


W = TypeVar("W", bound=_Worker)


def choose_worker(workers: Sequence[W], token_ids: Sequence[int]) -> tuple[W, str]:
    """Returns the chosen worker and why: ``prefix``, ``least_loaded`` or ``only``."""
    if len(workers) == 1:
        return workers[0], "only"
    best, best_key = workers[0], None
    for ws in workers:
        kv = ws.kv
        hit_blocks = kv.lookup_prefix(list(token_ids), len(token_ids) - 1).num_blocks
        needed = kv.blocks_for(len(token_ids)) - hit_blocks
        has_room = kv.num_free_blocks >= needed
        load = ws.sched.num_groups
        key = (has_room, hit_blocks if has_room else 0, -load, -kv.gpu.usage())
        if best_key is None or key > best_key:
            best, best_key = ws, key
    assert best_key is not None
    return best, "prefix" if best_key[1] > 0 else "least_loaded"
