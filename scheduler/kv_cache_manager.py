"""KV-cache metadata of one worker: block tables, sharing, copy-on-write, prefix caching, swap.

Owns a GPU ``BlockPool`` and a CPU swap ``BlockPool`` (the worker owns the memory behind them).
Every write target is made exclusive first: a block referenced by more than one sequence is copied
(copy-on-write) before a sequence writes into it, and the copy is returned as an op for the worker
to run in the same step, before the forward pass. So a block with ``ref_cnt > 1`` is never written,
except by the one step that fills it when a request admitted in that step shares it (below); such
a sharer only reads the block, and only after the step has written it.

A full block is cached (findable by its prefix hash) as soon as a step that writes it is
*planned*, not when that step returns, as in vLLM: in every layer the worker writes the K/V of all
of a step's tokens into the cache before attention reads it, so a request admitted later in the
same step can already point its table at the block. Who else learns of the hash waits until the
step has run (``commit_step``): the worker, which vouches for hashes across a scheduler restart,
and the kvstore index. Lookups are the only readers that may run ahead of the write.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from scheduler.block_hash import hash_block
from scheduler.block_pool import Block, BlockPool
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus


@dataclass
class PrefixHit:
    blocks: list[Block] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


@dataclass
class CacheEvents:
    """Prefix-index changes since the last drain, written behind to the kvstore in batches."""

    stored: list[tuple[bytes, int, tuple[int, ...], bytes | None]] = field(
        default_factory=list)  # (hash, block id, token ids, parent hash)
    removed: list[bytes] = field(default_factory=list)


class KVCacheManager:
    def __init__(
        self,
        num_gpu_blocks: int,
        num_cpu_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        watermark: float = 0.01,
        hash_extra: bytes = b"",
    ) -> None:
        self.block_size = block_size
        self.gpu = BlockPool(num_gpu_blocks, enable_caching)
        self.cpu = BlockPool(max(num_cpu_blocks, 1), enable_caching=False)
        self.has_swap = num_cpu_blocks > 0
        self.enable_caching = enable_caching
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        self.hash_extra = hash_extra
        self.events = CacheEvents()
        # Cached while planning the current step, whose writes have not run yet: moved to
        # ``events`` (and returned for the worker) by ``commit_step``.
        self.unwritten: list[tuple[bytes, int, tuple[int, ...], bytes | None]] = []
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    # ---- queries -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.gpu.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup_prefix(self, token_ids: list[int], max_tokens: int,
                      root: bytes | None = None) -> PrefixHit:
        """Longest run of cached full blocks covering at most ``max_tokens`` of ``token_ids``,
        in the chain that starts at ``root`` (the sequence's ``hash_root``: its cache salt)."""
        hit = PrefixHit()
        if not self.enable_caching:
            return hit
        parent = root
        bs = self.block_size
        for start in range(0, max_tokens - bs + 1, bs):
            tokens = tuple(token_ids[start : start + bs])
            parent = hash_block(parent, tokens, self.hash_extra)
            block = self.gpu.lookup(parent, tokens)
            if block is None:
                break
            hit.blocks.append(block)
            hit.hashes.append(parent)
        return hit

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks ``append_slots`` would allocate: table growth plus copy-on-write copies."""
        bs, blocks = self.block_size, seq.blocks
        first = seq.num_computed_tokens // bs
        last = -(-(seq.num_computed_tokens + num_new_tokens) // bs)
        num = max(0, last - len(blocks))
        for i in range(first, min(last, len(blocks))):  # hot path: no generator, no slice
            if blocks[i].ref_cnt > 1:
                num += 1
        return num

    def can_admit(self, num_blocks: int) -> bool:
        return self.gpu.num_free_blocks - num_blocks >= self.watermark_blocks

    # ---- mutations ---------------------------------------------------------------------------
    def admit(self, seq: Sequence, hit: PrefixHit) -> None:
        """Starts ``seq`` on the cached prefix ``hit`` (its blocks gain a reference)."""
        self.gpu.touch(hit.blocks)
        seq.blocks = list(hit.blocks)
        seq.block_hashes = list(hit.hashes)
        seq.num_computed_tokens = seq.num_cached_tokens = hit.num_blocks * self.block_size
        self.num_query_tokens += seq.num_tokens
        self.num_hit_tokens += seq.num_cached_tokens

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Makes room to write tokens ``[num_computed, +num_new_tokens)``: grows the table and
        copies shared blocks that will be written. Returns the copy ops, or ``None`` (and changes
        nothing) when the pool is short."""
        if self.num_new_blocks(seq, num_new_tokens) > self.gpu.num_free_blocks:
            return None
        copies: list[tuple[int, int]] = []
        first = seq.num_computed_tokens // self.block_size
        last = min(len(seq.blocks), self.blocks_for(seq.num_computed_tokens + num_new_tokens))
        for i in range(first, last):
            old = seq.blocks[i]
            if old.ref_cnt > 1:
                allocated = self.gpu.allocate(1)
                assert allocated is not None, "num_new_blocks counted this copy"
                new = allocated[0]
                copies.append((old.block_id, new.block_id))
                self.gpu.free([old])
                seq.blocks[i] = new
                seq.num_table_rewrites += 1
        grow = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.blocks)
        if grow > 0:
            new_blocks = self.gpu.allocate(grow)
            assert new_blocks is not None
            seq.blocks.extend(new_blocks)
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares every block of ``parent`` (one more reference each)."""
        self.gpu.touch(parent.blocks)
        child.blocks = list(parent.blocks)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens

    def free(self, seq: Sequence) -> None:
        """Releases the sequence's blocks tail-first (the end of a chain is evicted first)."""
        pool = self.cpu if seq.status == SequenceStatus.SWAPPED else self.gpu
        pool.free(list(reversed(seq.blocks)))
        seq.blocks = []

    def cache_full_blocks(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Caches, under its chain hash, every full block among the first ``num_tokens`` tokens
        of ``seq`` (default: its computed tokens). The scheduler calls it while planning a step,
        with the tokens computed once the step has run, so a later admission in the same step
        finds the blocks; ``commit_step`` announces them after the step."""
        bs, hashes = self.block_size, seq.block_hashes
        end = seq.num_computed_tokens if num_tokens is None else num_tokens
        if not self.enable_caching or end < (len(hashes) + 1) * bs:
            return
        token_ids = seq.token_ids
        num_full = min(end // bs, len(seq.blocks))
        parent = hashes[-1] if hashes else seq.hash_root
        cached = self.gpu.cached
        for i in range(len(hashes), num_full):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            prev, parent = parent, hash_block(parent, tokens, self.hash_extra)
            hashes.append(parent)
            block = seq.blocks[i]
            if block.block_hash is None and parent not in cached:
                self.gpu.cache_block(block, parent, tokens)
                self.unwritten.append((parent, block.block_id, tokens, prev))

    def commit_step(self) -> list[tuple[int, bytes]]:
        """The planned step has run, so the blocks cached while planning it hold their K/V: they
        go to the kvstore (``events``) and are returned as (block id, hash), for the worker to
        hear with the next step. Blocks freed meanwhile (an abort while the step ran) are
        included: the worker ran the whole step, and they stay cached until evicted."""
        if not self.unwritten:
            return []
        self.events.stored.extend(self.unwritten)
        published = [(entry[1], entry[0]) for entry in self.unwritten]
        self.unwritten = []
        return published

    # ---- swapping ----------------------------------------------------------------------------
    def can_swap_out(self, group: SequenceGroup) -> bool:
        return self.has_swap and len(self._distinct_blocks(group)) <= self.cpu.num_free_blocks

    def swap_out(self, group: SequenceGroup) -> list[tuple[int, int]]:
        """GPU -> CPU for every block of the group's live sequences; shared blocks move once."""
        return self._move(group, src=self.gpu, dst=self.cpu)

    def can_swap_in(self, group: SequenceGroup) -> bool:
        needed = len(self._distinct_blocks(group)) + len(group.live_seqs)  # + one to grow each
        return self.can_admit(needed)

    def swap_in(self, group: SequenceGroup) -> list[tuple[int, int]]:
        return self._move(group, src=self.cpu, dst=self.gpu)

    def restore_cached(
        self, entries: Iterable[tuple[bytes, int, tuple[int, ...], bytes | None]]
    ) -> list[bytes]:
        """Rebuilds cached-but-free blocks after a scheduler restart from (hash, block id, token
        ids, parent hash), least recently used first. Only on a fresh pool. An entry is skipped
        unless its hash re-computes from its parent and tokens (another model, a corrupt entry)
        and its block is claimed by no other entry (one of them must be stale). Returns the
        hashes restored."""
        entries = list(entries)
        claims: dict[int, int] = {}
        for _, block_id, _, _ in entries:
            claims[block_id] = claims.get(block_id, 0) + 1
        restored: list[bytes] = []
        for block_hash, block_id, tokens, parent in entries:
            if (claims[block_id] != 1 or len(tokens) != self.block_size
                    or hash_block(parent, tokens, self.hash_extra) != block_hash):
                continue
            if self.gpu.restore_cached(block_id, block_hash, tuple(tokens)):
                restored.append(block_hash)
        return restored

    def drain_events(self) -> CacheEvents:
        events, self.events = self.events, CacheEvents()
        evicted = self.gpu.drain_evicted()
        events.removed.extend(evicted)
        return events

    # ---- internals ---------------------------------------------------------------------------
    def _distinct_blocks(self, group: SequenceGroup) -> dict[int, Block]:
        return {b.block_id: b for s in group.live_seqs for b in s.blocks}

    def _move(self, group: SequenceGroup, src: BlockPool, dst: BlockPool) -> list[tuple[int, int]]:
        old_blocks = self._distinct_blocks(group)
        new_blocks = dst.allocate(len(old_blocks))
        assert new_blocks is not None, "caller checks can_swap_*"
        mapping = {bid: new for bid, new in zip(old_blocks, new_blocks, strict=True)}
        for new in new_blocks:  # references are re-counted below, one per user in the group
            new.ref_cnt = 0
        for seq in group.live_seqs:
            for block in seq.blocks:
                mapping[block.block_id].ref_cnt += 1
            src.free(list(reversed(seq.blocks)))
            seq.blocks = [mapping[b.block_id] for b in seq.blocks]
            seq.num_table_rewrites += 1
        return [(bid, new.block_id) for bid, new in mapping.items()]
