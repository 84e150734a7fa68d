"""Request placement across workers: each worker is an independent replica with its own pool.

Pools may differ in size (``--kv-cache-memory-gib``, ``--num-gpu-blocks``, GPU memory), so a
request goes only to a worker whose *whole* pool can hold it (``blocks_needed``): on a smaller
one it would preempt itself forever. Among those, it goes to the worker holding its longest cached
prefix among those with room for the prompt now; ties (including "no prefix anywhere") go to the
least loaded. A request that no worker's pool can hold is the engine's to refuse
(RESOURCE_EXHAUSTED), before it gets here.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Protocol, TypeVar

from pagedserve.core.errors import Unavailable
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.sequence import Sequence

if TYPE_CHECKING:
    from scheduler.policy import WorkerScheduler


class _Worker(Protocol):
    @property
    def kv(self) -> KVCacheManager: ...

    @property
    def sched(self) -> WorkerScheduler: ...


W = TypeVar("W", bound=_Worker)


def blocks_needed(num_prompt_tokens: int, max_tokens: int, num_samples: int,
                  block_size: int) -> int:
    """The most KV blocks one request can hold at once, as the engine accounts it: the prompt's
    blocks, shared by every sample, plus per sample the blocks of ``max_tokens`` outputs and one
    more (its own copy of the partial last prompt block, or of the block a beam fork shares).
    ``num_samples`` is ``max(n, best_of, beam_width)``. A continuation's already generated tokens
    count within ``max_tokens``."""
    per_sample = -(-max_tokens // block_size) + 1
    return -(-num_prompt_tokens // block_size) + num_samples * per_sample


def can_hold(kv: KVCacheManager, num_blocks: int) -> bool:
    """Whether the whole pool, empty, holds a request of ``num_blocks`` blocks."""
    return num_blocks <= kv.gpu.num_blocks


def choose_worker(workers: Seq[W], seq: Sequence, num_blocks: int) -> tuple[W, str]:
    """Returns the worker among ``workers`` (the healthy ones) for the request whose first
    sequence is ``seq``, and why: ``prefix``, ``least_loaded`` or ``only``. Prefixes are looked up
    in the sequence's own chain (its cache salt), so a prefix cached under another salt does not
    attract it. Raises ``Unavailable`` when none of them can hold a request of ``num_blocks``
    blocks (``blocks_needed``)."""
    fits = [ws for ws in workers if can_hold(ws.kv, num_blocks)]
    if not fits:
        if not workers:
            raise Unavailable("no healthy worker")
        raise Unavailable(f"no healthy worker has a KV pool that holds this request "
                          f"({num_blocks} blocks); the workers that can are down")
    if len(fits) == 1:
        return fits[0], "only"
    token_ids = seq.token_ids
    best, best_key = fits[0], None
    for ws in fits:
        kv = ws.kv
        hit_blocks = kv.lookup_prefix(token_ids, len(token_ids) - 1, seq.hash_root).num_blocks
        needed = kv.blocks_for(len(token_ids)) - hit_blocks
        has_room = kv.num_free_blocks >= needed
        load = ws.sched.num_groups
        key = (has_room, hit_blocks if has_room else 0, -load, -kv.gpu.usage())
        if best_key is None or key > best_key:
            best, best_key = ws, key
    assert best_key is not None
    return best, "prefix" if best_key[1] > 0 else "least_loaded"
