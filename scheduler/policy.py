"""Continuous (iteration-level) batching for one worker: FCFS admission under a token budget,
chunked prefill, and all-or-nothing preemption of the latest-arrived group.

Each step, in order:
1. ``_schedule_running``: every running group gets its next tokens (a prefill chunk or one decode
   token per live sequence). When blocks run short, the latest-arrived running group is preempted
   (swapped to CPU or dropped for recompute) until the earlier one fits.
2. ``_schedule_swapped``: if nothing was preempted this step, swapped groups come back in order.
3. ``_schedule_waiting``: if nothing is swapped out, waiting groups are admitted FCFS (longest
   cached prefix reused) while the budget, ``max_num_seqs`` and the watermark allow.

The budget counts tokens, except prefill chunks deep into a long prompt: attention grows with the
context, so a 2,048-token chunk at context 6,000 costs several times one at context 0, and the
running decodes sharing its step would stall that much longer. A chunk of ``n`` tokens starting at
context ``c`` costs ``chunk_cost(c, n, k)``: ``n`` while its mean context ``c + n/2`` is within
``k`` (the model's attention break-even context, reported by the worker), growing linearly beyond,
so late chunks of a long prompt shrink and every step costs about what a full chunk near ``k``
does. Decode tokens count 1 each, as before.

Each sequence's work is cached as soon as it is planned: every block it fills in this step becomes
findable by prefix hash (``KVCacheManager.cache_full_blocks``), so a group admitted later in the
same step shares blocks that this very step writes, and computes only its uncached suffix. That is
sound because the worker writes the K/V of every token of a step, in each layer, before attention
reads the cache (tests/kernels/test_same_step_kv_reads.py), and because a group is never preempted
in the step that planned its work (victims are always groups not yet planned), so a block cached
while planning is written by the step that cached it.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from collections import deque
from dataclasses import dataclass, field

from scheduler.block_pool import BlockPool
from scheduler.config import BatchingConfig, CacheConfig
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus
from scheduler.worker_mirror import WorkerMirror


def chunk_cost(context: int, num_tokens: int, break_even: int) -> int:
    """Budget units of a prefill chunk: ``num_tokens`` weighted by
    ``1 + max(0, context + num_tokens / 2 - break_even) / break_even`` (``break_even`` 0: by
    tokens only)."""
    if break_even <= 0 or num_tokens <= 1:
        return num_tokens
    excess = context + num_tokens / 2 - break_even
    if excess <= 0:
        return num_tokens
    return math.ceil(num_tokens * (1 + excess / break_even))


def max_chunk(context: int, wanted: int, budget: int, break_even: int) -> int:
    """The largest ``n <= wanted`` with ``chunk_cost(context, n) <= budget``."""
    n = min(wanted, budget)
    if break_even <= 0 or n <= 1 or chunk_cost(context, n, break_even) <= budget:
        return max(n, 0)
    # Beyond break-even the cost is n^2 / (2k) + n * c / k; solve = budget for n.
    n = min(n, int(math.sqrt(context * context + 2 * break_even * budget) - context))
    while n > 0 and chunk_cost(context, n, break_even) > budget:  # rounding
        n -= 1
    return n


@dataclass(slots=True)
class ScheduledSeq:
    group: SequenceGroup
    seq: Sequence
    num_new_tokens: int
    sample: bool


@dataclass
class StepPlan:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[tuple[SequenceGroup, str]] = field(default_factory=list)
    forks: list[tuple[SequenceGroup, Sequence]] = field(default_factory=list)  # made this step

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not (self.scheduled or self.copies or self.swap_out or self.swap_in)


class WorkerScheduler:
    """Owns the queues of one worker. ``seq_ids`` is shared by all workers' schedulers;
    ``mirror`` is what the worker knows (``scheduler.worker_mirror``), told here of every sequence
    released."""

    def __init__(
        self,
        kv: KVCacheManager,
        batching: BatchingConfig,
        cache: CacheConfig,
        seq_ids: itertools.count,
        mirror: WorkerMirror | None = None,
        break_even_context: int = 0,
    ) -> None:
        self.kv = kv
        self.break_even = break_even_context  # 0: prefill chunks cost their tokens
        self.mirror = mirror if mirror is not None else WorkerMirror()
        self.batching = batching
        self.cache = cache
        self.seq_ids = seq_ids
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self.swapped: deque[SequenceGroup] = deque()
        self.num_preemptions = {"swap": 0, "recompute": 0}

    # ---- queue management --------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self.mirror.has_news)

    @property
    def num_groups(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    def add(self, group: SequenceGroup) -> None:
        _insert_by_arrival(self.waiting, group)

    def groups(self) -> list[SequenceGroup]:
        return [*self.running, *self.swapped, *self.waiting]

    def remove(self, group: SequenceGroup) -> None:
        """Takes ``group`` out of whichever queue holds it and frees all its blocks."""
        for queue in (self.running, self.swapped, self.waiting):
            if group in queue:
                queue.remove(group)
        for seq in group.seqs:
            self.release(seq)

    def release(self, seq: Sequence) -> None:
        """Frees a sequence's blocks and tells the worker to forget it."""
        if seq.blocks:
            self.kv.free(seq)
        self.mirror.forget(seq.seq_id)

    # ---- the step ----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.batching.max_num_batched_tokens
        budget = self._schedule_running(plan, budget)
        if not plan.preempted:
            budget = self._schedule_swapped(plan, budget)
        if not self.swapped:
            self._schedule_waiting(plan, budget)
        return plan

    def _schedule_running(self, plan: StepPlan, budget: int) -> int:
        queue = deque(sorted(self.running, key=_ARRIVAL))
        running: list[SequenceGroup] = []
        self.running = running
        scheduled = plan.scheduled
        kv = self.kv
        gpu, bs, caching = kv.gpu, kv.block_size, kv.enable_caching
        while queue:
            group = queue.popleft()
            if (budget > 0 and group.forked and len(group.seqs) == 1
                    and self._try_decode(group.seqs[0], gpu, bs)):  # the steady-state fast path
                seq = group.seqs[0]
                scheduled.append(ScheduledSeq(group, seq, 1, True))
                end = seq.num_computed_tokens + 1
                if caching and end >= (len(seq.block_hashes) + 1) * bs:  # fills its block
                    kv.cache_full_blocks(seq, end)
                running.append(group)
                budget -= 1
                continue
            while not self._try_schedule(group, plan, budget):
                victim = queue.pop() if queue else group
                self._preempt(victim, plan)
                if victim is group:
                    break
            else:
                self.running.append(group)
                budget -= self._tokens_of(plan, group)
        return budget

    @staticmethod
    def _try_decode(seq: Sequence, gpu: BlockPool, bs: int) -> bool:
        """Plans one decode token for a lone running sequence whose write slot needs no
        copy-on-write and at most one fresh block; ``False`` (nothing changed) otherwise, and the
        general path decides. Equivalent to ``_try_schedule`` for this case, minus its work."""
        pos = seq.num_computed_tokens
        if len(seq.token_ids) - pos != 1 or seq.status is not SequenceStatus.RUNNING:
            return False
        blocks = seq.blocks
        index = pos // bs
        if index < len(blocks):
            return blocks[index].ref_cnt == 1
        if index == len(blocks) and gpu.num_free_blocks > 0:
            new_blocks = gpu.allocate(1)
            assert new_blocks is not None, "a free block was checked for above"
            blocks.extend(new_blocks)
            return True
        return False

    def _schedule_swapped(self, plan: StepPlan, budget: int) -> int:
        while self.swapped and budget > 0:
            group = self.swapped[0]
            if not self.kv.can_swap_in(group):
                break
            self.swapped.popleft()
            for seq in group.live_seqs:
                seq.status = SequenceStatus.RUNNING
            plan.swap_in.extend(self.kv.swap_in(group))
            # Short of room for its next chunk, it stays resident and runs from the next step.
            self._try_schedule(group, plan, budget)
            self.running.append(group)
            budget -= self._tokens_of(plan, group)
        return budget

    def _schedule_waiting(self, plan: StepPlan, budget: int) -> None:
        if not self.waiting:
            return
        num_seqs = sum(len(g.live_seqs) for g in self.running)
        while self.waiting and budget > 0 and num_seqs < self.batching.max_num_seqs:
            group = self.waiting[0]
            if not self._admit(group, budget):
                break
            self.waiting.popleft()
            self._try_schedule(group, plan, budget)  # admission checked the first chunk's room
            self.running.append(group)
            budget -= self._tokens_of(plan, group)
            num_seqs += len(group.live_seqs)

    def _admit(self, group: SequenceGroup, budget: int) -> bool:
        """Starts every live sequence of ``group`` on its longest cached prefix, if the first
        chunk of each fits above the watermark. Changes nothing when it returns ``False``."""
        plans = []
        needed = 0
        for seq in group.live_seqs:
            target = self._prompt_target(group) if seq is group.seqs[0] else seq.num_tokens
            hit = self.kv.lookup_prefix(seq.token_ids, min(target, seq.num_tokens - 1),
                                        seq.hash_root)
            cached = hit.num_blocks * self.kv.block_size
            chunk = max_chunk(cached, target - cached, budget, self.break_even)
            needed += self.kv.blocks_for(cached + chunk) - hit.num_blocks
            needed += sum(1 for b in hit.blocks if b.ref_cnt == 0)  # touching takes them off free
            plans.append((seq, hit))
        if not self.kv.can_admit(needed):
            return False
        for seq, hit in plans:
            self.kv.admit(seq, hit)
            seq.status = SequenceStatus.RUNNING
        return True

    # ---- per-group planning ------------------------------------------------------------------
    def _prompt_target(self, group: SequenceGroup) -> int:
        """Tokens the first sequence computes alone. Parallel samples stop one short: the last
        prompt token is computed by each fork, so each samples its own first token."""
        seq = group.seqs[0]
        if group.num_samples > 1 and not group.forked:
            return seq.num_tokens - 1
        return seq.num_tokens

    def _try_schedule(self, group: SequenceGroup, plan: StepPlan, budget: int) -> bool:
        """Plans the group's work this step; ``False`` (nothing changed) when blocks are short.
        A group with no budget left is kept running but does no work this step."""
        if group.num_samples > 1 and not group.forked:
            seq = group.seqs[0]
            if seq.num_computed_tokens >= seq.num_tokens - 1:
                self._fork_samples(group, plan)
        work = self._group_work(group, budget)
        if sum(self.kv.num_new_blocks(s, n) for s, n, _ in work) > self.kv.num_free_blocks:
            return False
        for seq, num_new, sample in work:
            copies = self.kv.append_slots(seq, num_new)
            assert copies is not None
            plan.copies.extend(copies)
            plan.scheduled.append(ScheduledSeq(group, seq, num_new, sample))
            # Shareable from now on, by admissions later in this step (see the module doc).
            self.kv.cache_full_blocks(seq, seq.num_computed_tokens + num_new)
        return True

    def _group_work(self, group: SequenceGroup, budget: int) -> list[tuple[Sequence, int, bool]]:
        work = []
        if not group.forked and group.num_samples > 1:
            seq = group.seqs[0]
            num_new = max_chunk(seq.num_computed_tokens,
                                self._prompt_target(group) - seq.num_computed_tokens, budget,
                                self.break_even)
            return [(seq, num_new, False)] if num_new > 0 else []
        for seq in group.live_seqs:
            num_new = max_chunk(seq.num_computed_tokens, seq.num_uncomputed_tokens, budget,
                                self.break_even)
            if num_new <= 0:
                break
            sample = seq.num_computed_tokens + num_new == seq.num_tokens
            work.append((seq, num_new, sample))
            budget -= chunk_cost(seq.num_computed_tokens, num_new, self.break_even)
        return work

    def _fork_samples(self, group: SequenceGroup, plan: StepPlan) -> None:
        parent = group.seqs[0]
        for index in range(1, group.num_samples):
            child = self.fork(parent, index)
            group.seqs.append(child)
            plan.forks.append((group, child))
        group.forked = True

    def fork(self, parent: Sequence, index: int) -> Sequence:
        """A new running sequence with the parent's tokens, sharing all its blocks."""
        child = Sequence(
            seq_id=next(self.seq_ids),
            index=index,
            token_ids=list(parent.token_ids),
            num_prompt_tokens=parent.num_prompt_tokens,
            status=SequenceStatus.RUNNING,
            num_streamed_tokens=parent.num_streamed_tokens,
            hash_root=parent.hash_root,
        )
        self.kv.fork(parent, child)
        child.fork_of = (parent.seq_id, parent.num_tokens)
        return child

    def _tokens_of(self, plan: StepPlan, group: SequenceGroup) -> int:
        """Budget just spent on ``group`` (tokens, chunks weighted by ``chunk_cost``). Its items
        are the plan's newest (``_try_schedule`` appends a group's work contiguously), so only
        the tail is scanned: O(group), not O(plan) per group, which made a step quadratic in the
        number of running groups. Planning already advanced nothing: ``num_computed_tokens`` is
        still where each chunk starts."""
        total = 0
        for item in reversed(plan.scheduled):
            if item.group is not group:
                break
            total += chunk_cost(item.seq.num_computed_tokens, item.num_new_tokens,
                                self.break_even)
        return total

    # ---- preemption --------------------------------------------------------------------------
    def _preempt(self, group: SequenceGroup, plan: StepPlan) -> None:
        """All-or-nothing. Multi-sequence groups prefer swap (recompute would lose sharing)."""
        mode = self.cache.preemption_mode
        if len(group.live_seqs) > 1 and self.kv.has_swap:
            mode = "swap"
        if mode == "swap" and not self.kv.can_swap_out(group):
            mode = "recompute"
        if mode == "swap":
            plan.swap_out.extend(self.kv.swap_out(group))
            for seq in group.live_seqs:
                seq.status = SequenceStatus.SWAPPED
            _insert_by_arrival(self.swapped, group)
        else:
            self._drop_for_recompute(group)
            _insert_by_arrival(self.waiting, group)
        plan.preempted.append((group, mode))
        self.num_preemptions[mode] += 1

    def _drop_for_recompute(self, group: SequenceGroup) -> None:
        """Drops the KV of every sequence; their tokens stay and are recomputed on readmission."""
        for seq in group.seqs:
            self.release(seq)
            if not seq.is_finished:
                seq.reset_for_recompute()


_ARRIVAL = operator.attrgetter("arrival_order")


def _insert_by_arrival(queue: deque[SequenceGroup], group: SequenceGroup) -> None:
    keys = [g.arrival_order for g in queue]
    queue.insert(bisect.bisect(keys, group.arrival_order), group)
