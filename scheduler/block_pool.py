"""Physical KV blocks of one worker: ref counts, an O(1) free queue, and the prefix-cache map.

The free queue doubles as the LRU eviction order for cached blocks::

    head (evicted first)                                   tail (freed most recently)
      [b7] <-> [b2] <-> [b9 hash=h1] <-> [b4 hash=h3] <-> [b5]

A block whose ref count drops to 0 is appended at the tail but *keeps its hash* (lazy eviction):
a later request with the same prefix finds it through ``cached`` and takes it back out of the middle
of the queue in O(1). Only when a block is popped from the head for new data is its hash dropped.

Invariants (checked by tests/unit/test_block_pool_state.py):
- a block is in the free queue iff its ref count is 0;
- ``num_free_blocks + (blocks with ref_cnt > 0) == num_blocks``;
- ``cached[h]`` is a block whose ``block_hash == h``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class Block:
    """One physical block. ``token_ids`` is kept only for cached (full, hashed) blocks so that a
    hash hit can be re-checked; a hash collision must never serve someone else's KV."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "prev", "next")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        self.token_ids: tuple[int, ...] | None = None
        self.prev: Block | None = None
        self.next: Block | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """Intrusive doubly linked list over ``Block.prev/next`` with sentinels: O(1) popleft,
    append and remove-from-middle."""

    def __init__(self, blocks: Iterable[Block]) -> None:
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> Block:
        block = self._head.next
        if block is self._tail or block is None:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def append(self, block: Block) -> None:
        last = self._tail.prev
        assert last is not None
        last.next, block.prev = block, last
        block.next, self._tail.prev = self._tail, block
        self.num_free += 1

    def remove(self, block: Block) -> None:
        assert block.prev is not None and block.next is not None, f"{block} not in free queue"
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.num_free -= 1

    def __iter__(self):  # head to tail; for tests and debugging
        block = self._head.next
        while block is not None and block is not self._tail:
            yield block
            block = block.next


class BlockPool:
    """All blocks of one device pool. Allocation returns ``None`` when there is not enough room:
    running out of blocks is a normal outcome the scheduler plans around, not an error."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[bytes, Block] = {}
        self.num_evictions = 0
        self._evicted: list[bytes] = []  # hashes dropped since the last drain (for the kvstore)

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold reusable prefix KV (O(cached))."""
        return sum(1 for b in self.cached.values() if b.ref_cnt == 0)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, num: int) -> list[Block] | None:
        """``num`` fresh blocks with ref count 1, evicting cached free blocks LRU-first."""
        if num > self.free_queue.num_free:
            return None
        blocks = [self.free_queue.popleft() for _ in range(num)]
        for block in blocks:
            self._evict(block)
            block.ref_cnt = 1
        return blocks

    def touch(self, blocks: Sequence[Block]) -> None:
        """Takes a reference on blocks found in the prefix cache (or shared by a fork)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free(self, blocks: Sequence[Block]) -> None:
        """Drops one reference from each block. Pass a sequence's blocks tail-first so that the
        end of a cached chain is evicted before its beginning (a prefix stays useful longer)."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_block(self, block: Block, block_hash: bytes, token_ids: tuple[int, ...]) -> None:
        """Publishes a full block under its chain hash. A block already holding an equal hash
        (same content computed twice) keeps the existing entry."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return
        block.block_hash, block.token_ids = block_hash, token_ids
        self.cached[block_hash] = block

    def restore_cached(self, block_id: int, block_hash: bytes, token_ids: tuple[int, ...]) -> bool:
        """Marks free block ``block_id`` as holding ``block_hash`` (a scheduler restart: the worker
        kept the memory) and moves it to the tail of the free queue, so call it least recently
        used first. Refused (``False``) if the block is in use or cached, or the hash is taken."""
        if not self.enable_caching or not 0 <= block_id < self.num_blocks:
            return False
        block = self.blocks[block_id]
        if block.ref_cnt or block.block_hash is not None or block_hash in self.cached:
            return False
        block.block_hash, block.token_ids = block_hash, token_ids
        self.cached[block_hash] = block
        self.free_queue.remove(block)
        self.free_queue.append(block)
        return True

    def lookup(self, block_hash: bytes, token_ids: tuple[int, ...]) -> Block | None:
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != token_ids:
            return None
        return block

    def drain_evicted(self) -> list[bytes]:
        evicted, self._evicted = self._evicted, []
        return evicted

    def _evict(self, block: Block) -> None:
        if block.block_hash is None:
            return
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
            self._evicted.append(block.block_hash)
            self.num_evictions += 1
        block.block_hash = None
        block.token_ids = None
