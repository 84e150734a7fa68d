"""``EngineCore``: the engine of one worker, synchronous, with no event loop and no I/O.

It owns the requests placed on its worker, their sequences and the worker's scheduler (queues,
block pools, the mirror of what the worker holds). One step is two calls around the worker::

    step = core.schedule()            # plan, build the delta, commit; None: nothing to do
    result = worker.step(step)        # in this thread, a thread, or over gRPC: not the core's job
    outputs = core.process(result)    # tokens -> each request's output strategy -> StepOutputs

``step(worker)`` does the three for a worker in this thread (tests, tools). What runs one core
per worker, places requests across workers and recovers from a failed worker is the async
runtime (``scheduler.engine.Engine``). One core per worker, not one core with a worker-indexed
plan: each worker has its own pools, queues and mirror, and steps at its own pace.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

from pagedserve.core.errors import RequestFailed, Unavailable
from pagedserve.core.step import TopPairs, WorkerResult, WorkerStep
from protos.pagedserve.v1 import common_pb2, worker_pb2
from scheduler.block_hash import chain_root
from scheduler.config import SchedulerConfig
from scheduler.events import StepStats
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.output_strategy import BeamOutputs, OutputStrategy, strategy_for
from scheduler.policy import StepPlan, WorkerScheduler
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus
from scheduler.step_builder import build_step, commit
from scheduler.stop import StopCriteria


@dataclass
class EngineIds:
    """Counters shared by every core of one engine: a request moved off a failed worker keeps
    its sequence ids and arrival order on its new one, so neither may repeat across workers."""

    seq_ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    arrivals: itertools.count = field(default_factory=itertools.count)
    step_ids: itertools.count = field(default_factory=lambda: itertools.count(1))


@dataclass(slots=True, eq=False)
class CoreRequest:
    """One request in a core: its sequences and the strategy that makes its outputs. What it
    gained that its consumer has not taken: tokens on its sequences past each one's
    ``num_streamed_tokens`` (when ``group.streams_tokens``), and ``strategy.logprobs`` and
    ``strategy.outputs``. ``has_news``: the core set it when a step gave the consumer something,
    and lists the request in ``StepOutputs.updated`` only then; the consumer clears it when it
    takes (``RequestStream.take``), so a consumer slower than the steps is told once."""

    group: SequenceGroup
    strategy: OutputStrategy
    has_news: bool = False
    accept: Callable[[Sequence, int, float, TopPairs], bool] = field(init=False)  # per token
    streams: bool = field(init=False)

    def __post_init__(self) -> None:
        self.accept = self.strategy.accept
        self.streams = self.group.streams_tokens

    @property
    def request_id(self) -> str:
        return self.group.request_id


@dataclass(slots=True)
class FinishedRequest:
    """A request that ended in this step: every sequence finished (statuses say why, see
    ``SequenceStatus.finish_reason``), every block freed. ``error`` is set when it failed."""

    request: CoreRequest
    error: BaseException | None = None


@dataclass(slots=True)
class StepOutputs:
    """What one step produced: the requests with news (``updated``, in first-sampled order),
    those that ended, and the step's typed stats record."""

    updated: list[CoreRequest]
    finished: list[FinishedRequest]
    stats: StepStats


class StepRunner(Protocol):
    """Runs a step in the caller's thread: ``worker.worker.Worker`` or a test double."""

    def step(self, step: WorkerStep) -> WorkerResult: ...


class EngineCore:
    """Invariants: ``requests`` holds every request this core runs, ``seqs`` every live sequence
    of those (forks included) by id; a request leaves both only through ``_remove``, which frees
    all its blocks. Between ``schedule`` and ``process`` a step is in flight (``_plan``)."""

    def __init__(self, name: str, config: SchedulerConfig, info: worker_pb2.WorkerInfo,
                 ids: EngineIds | None = None) -> None:
        self.name = name
        self.info = info
        self.ids = ids if ids is not None else EngineIds()
        kv = KVCacheManager(
            num_gpu_blocks=info.num_gpu_blocks,
            num_cpu_blocks=info.num_cpu_blocks,
            block_size=info.block_size,
            enable_caching=config.cache.enable_prefix_caching,
            watermark=config.cache.watermark,
            hash_extra=info.model.encode(),
        )
        self.sched = WorkerScheduler(kv, config.batching, config.cache, self.ids.seq_ids,
                                     break_even_context=info.attention_break_even_context)
        self.requests: dict[str, CoreRequest] = {}
        self.seqs: dict[int, tuple[Sequence, CoreRequest]] = {}
        self._plan: StepPlan | None = None
        self._started = 0.0

    @property
    def kv(self) -> KVCacheManager:
        return self.sched.kv

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Seq[int],
                    params: common_pb2.SamplingParams,
                    generated_token_ids: Seq[int] = (), cache_salt: bytes = b"") -> CoreRequest:
        """Queues a request whose ``params`` are resolved and whose ids were validated
        (``scheduler.engine.Engine.submit`` does both). ``generated_token_ids``: a continuation;
        ``cache_salt``: its prefix-cache partition (``new_request``)."""
        req = new_request(request_id, prompt_token_ids, params, generated_token_ids,
                          self.info.max_model_len, self.ids, cache_salt)
        self.add(req)
        return req

    def add(self, req: CoreRequest) -> None:
        """Queues a request made by ``new_request`` or taken from another core (``evacuate``)."""
        assert req.request_id not in self.requests, "the caller checks for running ids"
        self.requests[req.request_id] = req
        for seq in req.group.seqs:
            self.seqs[seq.seq_id] = (seq, req)
        self.sched.add(req.group)

    def abort(self, request_id: str) -> CoreRequest | None:
        """Ends the request (its sequences aborted) and frees every block; None if not here."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        for seq in req.group.seqs:
            if not seq.is_finished:
                seq.status = SequenceStatus.FINISHED_ABORTED
        self._remove(req)
        return req

    def remove(self, request_id: str) -> CoreRequest | None:
        """Takes the request out as it stands (the runtime's failure path) and frees its blocks."""
        req = self.requests.get(request_id)
        if req is not None:
            self._remove(req)
        return req

    def evacuate(self) -> list[CoreRequest]:
        """Every request, each reset to recompute from its tokens elsewhere; the worker's state
        is void (it failed), so nothing is freed here and this core must not be used again."""
        moved = [self.requests[g.request_id] for g in self.sched.groups()]
        for req in moved:
            for seq in req.group.seqs:
                if seq.is_finished:  # released already, unless the step failed half-processed
                    seq.blocks = []
                else:
                    seq.reset_for_recompute()
        self.requests.clear()
        self.seqs.clear()
        return moved

    # ---- the step ----------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        """Whether a step would run something or tell the worker something."""
        return self.sched.has_work

    def step(self, worker: StepRunner) -> StepOutputs | None:
        """One whole step against a worker in this thread; None when there was nothing to do."""
        step = self.schedule()
        if step is None:
            return None
        return self.process(worker.step(step))

    def schedule(self) -> WorkerStep | None:
        """Plans the next step and commits it (``step_builder.commit``); the worker must run the
        returned step before the next ``schedule``. None: nothing to run or tell the worker."""
        assert self._plan is None, "the previous step was not processed"
        self._started = time.perf_counter()
        sched = self.sched
        plan = sched.schedule()
        mirror = sched.mirror
        if plan.is_empty and not mirror.has_news:  # (published blocks wait for a real step)
            return None
        for group, child in plan.forks:  # forks made by this plan join the index
            req = self.requests.get(group.request_id)
            if req is not None:
                self.seqs[child.seq_id] = (child, req)
        step = build_step(next(self.ids.step_ids), plan, mirror)
        commit(plan, mirror)
        self._plan = plan
        return step

    def process(self, result: WorkerResult) -> StepOutputs:
        """Hands each sampled token to its request's strategy and ends what finished. The hot
        path: per token a dict lookup, one call, one append; no message is built (the consumer
        reads new tokens off the sequences when it wakes). Raises ``Unavailable`` for a result
        that does not fit the step (the worker's fault; the runtime fails the worker over)."""
        plan, self._plan = self._plan, None
        assert plan is not None, "process follows schedule"
        # The blocks cached while planning the step are written now; the worker hears next step.
        self.sched.mirror.cached.extend(self.kv.commit_step())
        num_rows = len(result.seq_ids)
        if (not num_rows == len(result.token_ids) == len(result.logprobs)
                or len(result.top_logprobs) not in (0, num_rows)):
            raise Unavailable(f"worker {self.name} answered step with ragged columns")
        tops: Iterable[TopPairs] = result.top_logprobs or itertools.repeat([])  # (checked above)
        seqs_get = self.seqs.get
        updated: list[CoreRequest] = []
        ending: list[CoreRequest] = []
        num_generated = num_rows
        for seq_id, token_id, logprob, top in zip(result.seq_ids, result.token_ids,
                                                  result.logprobs, tops, strict=False):
            entry = seqs_get(seq_id)
            if entry is None:  # aborted while the step ran
                num_generated -= 1
                continue
            seq, req = entry
            if req.accept(seq, token_id, logprob, top):
                ending.append(req)
            if not req.has_news and req.streams:
                req.has_news = True
                updated.append(req)
        finished = self._end_step(ending, updated)
        stats = StepStats(self.name, time.perf_counter() - self._started, result.forward_seconds,
                          result.sample_seconds, plan, num_generated)
        return StepOutputs(updated, finished, stats)

    def _end_step(self, ending: list[CoreRequest],
                  updated: list[CoreRequest]) -> list[FinishedRequest]:
        finished: list[FinishedRequest] = []
        for req in dict.fromkeys(ending):  # once each, in order
            group = req.group
            try:
                req.strategy.end_step(group, self)
            except Exception as exc:  # this request's fault alone (e.g. its beam scoring): the
                # rest of the step goes on; the runtime ends it and frees its blocks
                finished.append(FinishedRequest(req, RequestFailed(
                    f"request {group.request_id!r} failed in the scheduler: "
                    f"{type(exc).__name__}: {exc}")))
                continue
            if req.strategy.outputs and not req.has_news:
                req.has_news = True
                updated.append(req)
            if group.is_finished:
                self._remove(req)
                finished.append(FinishedRequest(req))
        return finished

    # ---- SeqHost, for output strategies ------------------------------------------------------
    def release(self, seq: Sequence) -> None:
        self.sched.release(seq)
        self.seqs.pop(seq.seq_id, None)

    def fork(self, parent: Sequence, index: int) -> Sequence:
        child = self.sched.fork(parent, index)
        self.seqs[child.seq_id] = (child, self.seqs[parent.seq_id][1])
        return child

    def _remove(self, req: CoreRequest) -> None:
        del self.requests[req.request_id]
        for seq in req.group.seqs:
            self.seqs.pop(seq.seq_id, None)
        self.sched.remove(req.group)


def new_request(request_id: str, prompt: Seq[int], params: common_pb2.SamplingParams,
                generated: Seq[int], max_model_len: int, ids: EngineIds,
                cache_salt: bytes = b"") -> CoreRequest:
    """A request's group (one sequence: prompt plus any tokens already generated) and its output
    strategy. ``params`` are resolved: their ``stop_token_ids`` is the whole stop set. Its blocks
    are shared only with requests of the same ``cache_salt`` (empty: the shared partition)."""
    seq = Sequence(
        seq_id=next(ids.seq_ids), index=0, token_ids=[*prompt, *generated],
        num_prompt_tokens=len(prompt), num_streamed_tokens=len(generated),
        hash_root=chain_root(cache_salt),
    )
    stop = StopCriteria(params, max_model_len, len(prompt))
    strategy = strategy_for(params, stop)
    beam = strategy.beam if isinstance(strategy, BeamOutputs) else None  # the worker must know
    samples = 1 if beam is not None else num_samples(params)
    group = SequenceGroup(request_id, [seq], params, next(ids.arrivals), beam=beam,
                          num_samples=samples, forked=samples == 1)
    return CoreRequest(group, strategy)


def num_samples(params: common_pb2.SamplingParams) -> int:
    """Sequences a request runs at most: ``best_of`` (>= n) samples, or ``beam_width`` beams."""
    return max(params.n, params.best_of, params.beam_width, 1)
