"""Hypothesis state machine over the KV cache manager: the block-pool invariants hold after any
sequence of admissions (with prefix-cache hits, also on blocks that a step being planned fills:
same-step prefix sharing), appends (with copy-on-write), forks, frees and swaps.

- a block's ref count equals the number of block-table references to it;
- a block is free (in the free queue) or referenced, never both;
- the total is conserved: free + referenced == num_blocks (GPU and CPU pools alike);
- no shared block is ever written: every block an append writes into has ref count 1;
- a prefix-cache hit returns a block whose stored tokens equal the looked-up tokens.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from protos.pagedserve.v1 import common_pb2
from scheduler.block_pool import BlockPool, FreeBlockQueue
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus

BLOCK = 4
TOKENS = st.lists(st.integers(0, 3), min_size=1, max_size=14)  # tiny alphabet: many shared prefixes


class KVCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(num_gpu_blocks=24, num_cpu_blocks=16, block_size=BLOCK)
        self.seqs: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.next_id = 0

    def _new_seq(self, tokens: list[int]) -> Sequence:
        self.next_id += 1
        return Sequence(seq_id=self.next_id, index=0, token_ids=list(tokens),
                        num_prompt_tokens=len(tokens), status=SequenceStatus.RUNNING)

    @rule(tokens=TOKENS)
    def admit(self, tokens):
        seq = self._new_seq(tokens)
        if not self._admit(seq):
            return
        self._write(seq, seq.num_uncomputed_tokens)
        self.seqs.append(seq)

    @rule(data=st.data(), tokens=TOKENS, suffix=TOKENS)
    def admit_two_in_one_step(self, data, tokens, suffix):
        """The second request is admitted while the first one's step is planned but has not run:
        it may share the blocks that step fills."""
        first = self._new_seq(tokens)
        if not self._admit(first):
            return
        num_new = first.num_uncomputed_tokens
        assert self._plan(first, num_new), "admission checked the room"
        second = self._new_seq(tokens[: data.draw(st.integers(0, len(tokens)))] + suffix)
        if self._admit(second):
            assert self._plan(second, second.num_uncomputed_tokens)
            self._ran(second, second.num_uncomputed_tokens)
            self.seqs.append(second)
        self._ran(first, num_new)
        self.seqs.append(first)

    def _admit(self, seq: Sequence) -> bool:
        tokens = seq.token_ids
        hit = self.kv.lookup_prefix(tokens, seq.num_tokens - 1)
        for block, start in zip(hit.blocks, range(0, len(tokens), BLOCK), strict=False):
            assert block.token_ids == tuple(tokens[start:start + BLOCK])
        needed = self.kv.blocks_for(seq.num_tokens) - hit.num_blocks + sum(
            1 for b in hit.blocks if b.ref_cnt == 0)
        if needed > self.kv.num_free_blocks:
            return False
        self.kv.admit(seq, hit)
        return True

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), new_tokens=st.lists(st.integers(0, 3), min_size=1, max_size=5))
    def append(self, data, new_tokens):
        seq = data.draw(st.sampled_from(self.seqs))
        seq.token_ids.extend(new_tokens)
        if not self._write(seq, len(new_tokens)):
            del seq.token_ids[-len(new_tokens):]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.seqs))
        child = self._new_seq(parent.token_ids)
        self.kv.fork(parent, child)
        self.seqs.append(child)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.seqs))
        self.kv.free(seq)
        self.seqs.remove(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def swap_out(self, data):
        seq = data.draw(st.sampled_from(self.seqs))
        group = SequenceGroup("g", [seq], common_pb2.SamplingParams(), 0)
        if not self.kv.can_swap_out(group):
            return
        self.kv.swap_out(group)
        seq.status = SequenceStatus.SWAPPED
        self.seqs.remove(seq)
        self.swapped.append(seq)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        seq = data.draw(st.sampled_from(self.swapped))
        group = SequenceGroup("g", [seq], common_pb2.SamplingParams(), 0)
        if not self.kv.can_swap_in(group):
            return
        self.kv.swap_in(group)
        seq.status = SequenceStatus.RUNNING
        self.swapped.remove(seq)
        self.seqs.append(seq)

    def _write(self, seq: Sequence, num_new: int) -> bool:
        if not self._plan(seq, num_new):
            return False
        self._ran(seq, num_new)
        return True

    def _plan(self, seq: Sequence, num_new: int) -> bool:
        """What the scheduler does for a step's work: room (and copies), then the blocks the
        step fills are cached at once."""
        copies = self.kv.append_slots(seq, num_new)
        if copies is None:
            return False
        first = seq.num_computed_tokens // BLOCK
        last = -(-(seq.num_computed_tokens + num_new) // BLOCK)
        for block in seq.blocks[first:last]:
            assert block.ref_cnt == 1, f"writing into shared {block}"
            assert block.block_hash is None, f"writing into cached {block}"
        self.kv.cache_full_blocks(seq, seq.num_computed_tokens + num_new)
        return True

    def _ran(self, seq: Sequence, num_new: int) -> None:
        seq.num_computed_tokens += num_new
        self.kv.commit_step()

    @invariant()
    def ref_counts_match_block_tables(self):
        for pool, seqs in ((self.kv.gpu, self.seqs), (self.kv.cpu, self.swapped)):
            refs = Counter(b.block_id for s in seqs for b in s.blocks)
            for block in pool.blocks:
                assert block.ref_cnt == refs.get(block.block_id, 0), block
            _check_pool(pool)


def _check_pool(pool: BlockPool) -> None:
    free_ids = [b.block_id for b in pool.free_queue]
    assert len(free_ids) == len(set(free_ids)) == pool.num_free_blocks
    for block in pool.blocks:
        assert (block.block_id in set(free_ids)) == (block.ref_cnt == 0), block
    assert pool.num_free_blocks + sum(1 for b in pool.blocks if b.ref_cnt > 0) == pool.num_blocks
    for block_hash, block in pool.cached.items():
        assert block.block_hash == block_hash


TestKVCacheMachine = KVCacheMachine.TestCase
TestKVCacheMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_free_queue_removes_from_the_middle_in_constant_time():
    blocks = BlockPool(5).blocks
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    assert [b.block_id for b in queue] == [0, 1, 3, 4]
    assert queue.popleft().block_id == 0
    queue.append(blocks[2])
    assert [b.block_id for b in queue] == [1, 3, 4, 2]


def test_cached_free_blocks_are_evicted_lru_first_and_keep_their_hash_until_then():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache_block(a, b"a", (1,))
    pool.cache_block(b, b"b", (2,))
    pool.free([b])  # b freed first: least recently used
    pool.free([a])
    assert pool.lookup(b"a", (1,)) is a and pool.lookup(b"b", (2,)) is b
    assert pool.lookup(b"a", (9,)) is None  # a hash hit is re-checked against the tokens
    (new,) = pool.allocate(1)
    assert new is b and pool.lookup(b"b", (2,)) is None and pool.lookup(b"a", (1,)) is a
