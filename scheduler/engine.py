"""The scheduler's async runtime: requests in, token streams out, one step loop per worker.

The engine of each worker is a synchronous ``scheduler.engine_core.EngineCore``; this runtime
wraps the cores with what needs an event loop or sees several workers: per-worker step loops
calling the worker handle, placement across workers, request streams, and failover and rejoin.
Per worker, the loop is::

    step = core.schedule(); result = await handle.step(step); outputs = core.process(result)

then ``outputs`` go to the requests' ``RequestStream``s and the observers. Everything runs on one
asyncio event loop, so scheduler state needs no locks; only the worker's computation leaves the
loop (a thread for in-process workers, an RPC for remote ones).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

from pagedserve.core.errors import (
    Aborted,
    InvalidArgument,
    PagedServeError,
    RequestFailed,
    ResourceExhausted,
    StepRefused,
    Unavailable,
    WorkerFault,
)
from pagedserve.core.request_id import check_request_id
from pagedserve.core.token_ids import check_token_ids
from protos.pagedserve.v1 import common_pb2, scheduler_pb2, worker_pb2
from scheduler.config import SchedulerConfig
from scheduler.engine_core import (
    CoreRequest,
    EngineCore,
    EngineIds,
    StepOutputs,
    new_request,
    num_samples,
)
from scheduler.events import EngineObserver
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.placement import blocks_needed, choose_worker
from scheduler.policy import WorkerScheduler
from scheduler.request_stream import RequestStream
from scheduler.worker_handle import WorkerHandle

logger = logging.getLogger(__name__)


# A request in the failed (or timed-out) steps of this many workers is failed, not moved again:
# a request that brings workers down must not go round them all. Workers that are merely gone
# (unreachable) do not count.
MAX_WORKER_FAILURES = 2


@dataclass
class WorkerState:
    """One worker as the runtime sees it: its handle, its engine core and its step loop."""

    handle: WorkerHandle
    info: worker_pb2.WorkerInfo
    core: EngineCore
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    healthy: bool = True
    task: asyncio.Task | None = None
    num_steps: int = 0

    @property
    def sched(self) -> WorkerScheduler:
        return self.core.sched

    @property
    def kv(self) -> KVCacheManager:
        return self.core.kv


class PrefixIndexSync(Protocol):
    """Write-behind of a worker's prefix index to the kvstore (``scheduler.prefix_sync``)."""

    async def restore(self, ws: WorkerState) -> int:
        """Loads what the kvstore holds for this worker; returns the blocks it restored."""

    def record(self, ws: WorkerState) -> None: ...

    async def close(self) -> None:
        """Flushes and seals the index; called by its owner once the engine has stopped."""


@dataclass
class _Request:
    core_req: CoreRequest
    stream: RequestStream
    worker: WorkerState


class Engine:
    """``observers`` hear of placements, steps and finished requests (``scheduler.events``);
    ``prefix_sync`` keeps the kvstore's prefix index in step (None: the in-memory view only)."""

    def __init__(self, config: SchedulerConfig, handles: Seq[WorkerHandle],
                 observers: Seq[EngineObserver] = (),
                 prefix_sync: PrefixIndexSync | None = None) -> None:
        if not handles:
            raise ValueError("the scheduler needs at least one worker")
        self.config = config
        self._joining = list(handles)  # until ``start`` makes each a WorkerState in ``workers``
        self.workers: list[WorkerState] = []
        self.requests: dict[str, _Request] = {}
        self._ids = EngineIds()
        self.model_info = scheduler_pb2.SchedulerModelInfo()
        self.num_finished_requests = 0
        self.num_generated_tokens = 0
        self.observers = list(observers)
        self.prefix_sync = prefix_sync
        self.background_tasks: list[asyncio.Task] = []  # cancelled by stop()

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        handles = self._joining
        infos = await asyncio.gather(*(h.info() for h in handles))
        first = infos[0]
        for handle, info in zip(handles, infos, strict=True):
            self._check_worker(handle.name, info, first.model, first.block_size)
        for handle, info in zip(handles, infos, strict=True):
            await handle.reset()  # drops sequences; the KV memory (cached prefixes) stays
            ws = WorkerState(handle, info, self._new_core(handle.name, info))
            if self.prefix_sync is not None:
                await self.prefix_sync.restore(ws)
            self.workers.append(ws)
        self._joining = []
        self.model_info = scheduler_pb2.SchedulerModelInfo(
            model=first.model,
            max_model_len=first.max_model_len,
            vocab_size=first.vocab_size,
            block_size=first.block_size,
            eos_token_ids=first.eos_token_ids,
        )
        self._advertise_capacity()
        for ws in self.workers:
            ws.task = asyncio.create_task(self._worker_loop(ws), name=f"step-loop-{ws.handle.name}")

    async def add_worker(self, handle: WorkerHandle) -> None:
        """Admits a worker discovered after start (same model and block size required)."""
        info = await handle.info()
        self._check_worker(handle.name, info, self.model_info.model, self.model_info.block_size)
        await handle.reset()
        ws = WorkerState(handle, info, self._new_core(handle.name, info))
        if self.prefix_sync is not None:
            await self.prefix_sync.restore(ws)
        self.workers.append(ws)
        self._advertise_capacity()
        ws.task = asyncio.create_task(self._worker_loop(ws), name=f"step-loop-{handle.name}")
        logger.info("worker %s joined with %d blocks", handle.name, info.num_gpu_blocks)

    async def stop(self) -> None:
        for task in self.background_tasks:
            task.cancel()
        for ws in self.workers:
            if ws.task is not None:
                ws.task.cancel()
        await asyncio.gather(*(ws.task for ws in self.workers if ws.task), return_exceptions=True)
        for req in list(self.requests.values()):
            self._finish_request(req, error=Unavailable("scheduler shutting down"))
        for handle in [*self._joining, *(ws.handle for ws in self.workers)]:
            await handle.close()

    def _check_worker(self, name: str, info: worker_pb2.WorkerInfo, model: str,
                      block_size: int) -> None:
        """A worker joins only if it serves ``model`` with ``block_size``, and was started for
        steps at least as large as this scheduler plans: on CUDA a worker sizes its KV pool by
        profiling a step of its own ``--max-num-batched-tokens``/``--max-num-seqs``, so a
        larger step could run it out of memory (0 = the worker does not say; not checked)."""
        if info.model != model or info.block_size != block_size:
            raise ValueError(f"worker {name} serves {info.model} with block size "
                             f"{info.block_size}, not {model} with {block_size}")
        batching = self.config.batching
        for flag, theirs, ours in (
                ("--max-num-batched-tokens", info.max_num_batched_tokens,
                 batching.max_num_batched_tokens),
                ("--max-num-seqs", info.max_num_seqs, batching.max_num_seqs)):
            if theirs and theirs < ours:
                raise ValueError(
                    f"worker {name} was started with {flag} {theirs}, but this scheduler plans "
                    f"steps of up to {ours}: the worker sized its memory for smaller steps. "
                    f"Give the scheduler and every worker the same {flag}")

    def _advertise_capacity(self) -> None:
        """``max_num_tokens_per_request`` is the largest pool: what the largest worker can ever
        hold (placement sends each request only to a worker whose pool holds it)."""
        largest = max(ws.info.num_gpu_blocks for ws in self.workers)
        self.model_info.max_num_tokens_per_request = largest * self.model_info.block_size

    def _new_core(self, name: str, info: worker_pb2.WorkerInfo) -> EngineCore:
        return EngineCore(name, self.config, info, self._ids)

    # ---- requests ----------------------------------------------------------------------------
    def submit(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: common_pb2.SamplingParams,
        generated_token_ids: Seq[int] = (),
        cache_salt: bytes = b"",
    ) -> RequestStream:
        """Queues a request (or a continuation of one) and returns its output stream.
        ``params`` must be resolved (``pagedserve.core.sampling.resolve_sampling_params``, with this
        model's ``eos_token_ids``): their ranges are not checked again here, and their
        ``stop_token_ids`` is the whole stop set. ``cache_salt``: the request shares prefix-cache
        blocks only with requests of the same salt (a continuation must repeat its salt)."""
        num_blocks = blocks_needed(len(prompt_token_ids), params.max_tokens,
                                   num_samples(params), self.model_info.block_size)
        self._validate(request_id, prompt_token_ids, generated_token_ids, params.max_tokens,
                       num_blocks)
        core_req = new_request(request_id, prompt_token_ids, params, generated_token_ids,
                               self.model_info.max_model_len, self._ids, cache_salt)
        group = core_req.group
        group.num_blocks_needed = num_blocks
        ws = self._place(core_req)
        stream = RequestStream(request_id, core_req)
        self.requests[request_id] = _Request(core_req, stream, ws)
        ws.core.add(core_req)
        ws.wakeup.set()
        logger.debug("request %s: %d prompt tokens on %s", request_id, len(prompt_token_ids),
                     ws.handle.name)
        return stream

    def abort(self, request_id: str) -> bool:
        """Frees every block of the request; its stream ends with ``Aborted`` (a consumer that
        is still reading was stopped by someone else). ``False`` if it was not running."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        req.stream.close(Aborted(f"request {request_id!r} was aborted on the server"))
        req.worker.core.abort(request_id)
        self._finish_request(req)
        logger.debug("request %s aborted", request_id)
        return True

    def _validate(self, request_id: str, prompt: Seq[int], generated: Seq[int],
                  max_tokens: int, num_blocks: int) -> None:
        """What only the scheduler knows (running ids, pool capacity, its queue), plus token-id
        ranges: a ``Submit`` from a tool, or the offline ``LLM``, did not pass a router. Sampling
        params were validated where they were resolved."""
        info = self.model_info
        check_request_id(request_id)
        if request_id in self.requests:
            raise InvalidArgument("request_id", f"{request_id!r} is already running")
        if not prompt:
            raise InvalidArgument("prompt_token_ids", "must not be empty")
        check_token_ids(prompt, info.vocab_size, "prompt_token_ids")
        check_token_ids(generated, info.vocab_size, "generated_token_ids")
        if len(generated) >= max_tokens:  # else the sequence would outgrow what was resolved
            raise InvalidArgument("generated_token_ids", f"{len(generated)} tokens already "
                                  f"reach max_tokens={max_tokens}: nothing is left to generate")
        capacity = info.max_num_tokens_per_request // info.block_size
        if num_blocks > capacity:
            raise ResourceExhausted(
                f"request needs up to {num_blocks} KV blocks but the largest worker pool holds "
                f"{capacity}: shorten the prompt, lower max_tokens or n, or add KV memory")
        waiting = sum(len(ws.sched.waiting) for ws in self.workers)
        if waiting >= self.config.batching.max_waiting_requests:
            raise ResourceExhausted(f"{waiting} requests already waiting; retry later")

    def _place(self, req: CoreRequest) -> WorkerState:
        group = req.group
        healthy = [ws for ws in self.workers if ws.healthy]
        ws, reason = choose_worker(healthy, group.seqs[0], group.num_blocks_needed)
        for observer in self.observers:
            observer.on_placement(ws.handle.name, reason)
        group.worker_id = ws.handle.name
        return ws

    # ---- the step loop -----------------------------------------------------------------------
    async def _worker_loop(self, ws: WorkerState) -> None:
        while True:
            if not ws.core.has_work or not ws.healthy:
                ws.wakeup.clear()
                await ws.wakeup.wait()
                continue
            try:
                await self._step(ws)
            except PagedServeError as exc:
                logger.error("worker %s failed: %s", ws.handle.name, exc)
                # Gone (unreachable) is no request's doing; a failed or timed-out step may be.
                await self._fail_worker(ws, suspect_requests=isinstance(exc, WorkerFault))
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not silently stall every request on this worker
                logger.exception("step on worker %s failed", ws.handle.name)
                await self._fail_worker(ws, suspect_requests=True)

    async def _step(self, ws: WorkerState) -> None:
        core = ws.core
        step = core.schedule()
        if step is None:
            ws.wakeup.clear()
            await ws.wakeup.wait()  # e.g. waiting on blocks held by requests about to finish
            return
        try:
            result = await ws.handle.step(step)
        except StepRefused as exc:  # the worker changed nothing; its sequences are reset
            await self._recover_refused_step(ws, exc)
            return
        ws.num_steps += 1
        outputs = core.process(result)
        self._deliver(outputs)
        if self.prefix_sync is not None:
            self.prefix_sync.record(ws)  # queues index changes; the I/O happens elsewhere
        for observer in self.observers:
            observer.on_step(outputs.stats)

    def _deliver(self, outputs: StepOutputs) -> None:
        """Wakes the streams of requests with news (each stream reads its request's tokens,
        log-probs and whole outputs when its consumer takes them) and ends the finished ones."""
        self.num_generated_tokens += outputs.stats.num_generated_tokens
        requests_get = self.requests.get
        for core_req in outputs.updated:
            req = requests_get(core_req.group.request_id)
            if req is not None:
                req.stream.notify()
        for done in outputs.finished:
            req = requests_get(done.request.group.request_id)
            if req is not None:
                self._finish_request(req, done.error)

    def _finish_request(self, req: _Request, error: BaseException | None = None) -> None:
        """The one exit path for a request: finished, aborted, failed. Frees every block (the
        core already did for one that finished or was aborted)."""
        request_id = req.core_req.group.request_id
        self.requests.pop(request_id, None)
        req.worker.core.remove(request_id)
        req.worker.wakeup.set()  # the worker must hear about dropped sequences
        if error is None:
            self.num_finished_requests += 1
        for observer in self.observers:
            observer.on_finished(req.core_req.group, error)
        req.stream.close(error)

    # ---- failures ----------------------------------------------------------------------------
    async def _recover_refused_step(self, ws: WorkerState, exc: StepRefused) -> None:
        """The worker is up and changed nothing, so it stays in service. The request whose
        sequence it named fails with the worker's reason (requests are checked on submit, so
        this one bypassed the checks); the worker drops its sequences and the others recompute
        on it as continuations. A refusal that names no sequence is a fault of the scheduler's
        view of the worker: the worker is failed as before."""
        entry = ws.core.seqs.get(exc.seq_id) if exc.seq_id is not None else None
        req = self.requests.get(entry[1].group.request_id) if entry is not None else None
        if req is None:
            logger.error("worker %s refused a step: %s", ws.handle.name, exc)
            await self._fail_worker(ws, suspect_requests=True)
            return
        logger.error("request %s refused by worker %s: %s", req.core_req.group.request_id,
                     ws.handle.name, exc)
        self._finish_request(req, error=exc)
        try:
            await ws.handle.reset()
        except PagedServeError as reset_exc:
            logger.error("worker %s failed: %s", ws.handle.name, reset_exc)
            await self._fail_worker(ws, suspect_requests=False)
            return
        self._move_groups(ws, [w for w in self.workers if w.healthy], count_failure=False)

    async def _fail_worker(self, ws: WorkerState, suspect_requests: bool) -> None:
        """A worker that fails a step loses only KV memory: its requests move elsewhere as
        continuations (prompt + generated tokens, recomputed); clients see no gap. With
        ``suspect_requests`` (the step failed or hung, rather than the worker being gone) the
        failure counts against each of them (``MAX_WORKER_FAILURES``)."""
        ws.healthy = False
        self._move_groups(ws, [w for w in self.workers if w.healthy],
                          count_failure=suspect_requests)
        asyncio.get_running_loop().create_task(self._reconnect(ws))

    def _move_groups(self, ws: WorkerState, targets: list[WorkerState],
                     count_failure: bool) -> None:
        """Voids ``ws``'s metadata (a fresh core) and places its requests on ``targets`` as
        continuations; one that none of them can hold ends ``UNAVAILABLE``, and one already on
        ``MAX_WORKER_FAILURES`` failed workers ends ``INTERNAL``."""
        moved = ws.core.evacuate()
        ws.core = self._new_core(ws.handle.name, ws.info)
        for core_req in moved:
            group = core_req.group
            req = self.requests.get(group.request_id)
            if req is None:
                continue
            group.num_worker_failures += count_failure
            if group.num_worker_failures >= MAX_WORKER_FAILURES:
                self._finish_request(req, error=RequestFailed(
                    f"request {group.request_id!r} was on {group.num_worker_failures} workers "
                    f"when they failed; not retried"))
                continue
            try:
                target, _ = choose_worker(targets, group.seqs[0], group.num_blocks_needed)
            except Unavailable as exc:  # none left, or none whose pool holds it
                self._finish_request(req, error=exc)
                continue
            req.worker = target
            target.core.add(core_req)
            target.wakeup.set()

    async def _reconnect(self, ws: WorkerState, interval: float = 2.0) -> None:
        while not ws.healthy:
            await asyncio.sleep(interval)
            try:
                info = await ws.handle.info()
                self._check_worker(ws.handle.name, info, self.model_info.model,
                                   self.model_info.block_size)
                await ws.handle.reset()
            except PagedServeError:
                continue
            except ValueError as exc:  # restarted with another model or a smaller step budget
                logger.error("worker %s cannot rejoin: %s", ws.handle.name, exc)
                continue
            ws.info, ws.core, ws.healthy = info, self._new_core(ws.handle.name, info), True
            self._advertise_capacity()  # it may be back with another pool size
            logger.info("worker %s is back with %d blocks", ws.handle.name, info.num_gpu_blocks)

    # ---- introspection -----------------------------------------------------------------------
    def stats(self) -> scheduler_pb2.SchedulerStats:
        stats = scheduler_pb2.SchedulerStats(
            num_finished_requests=self.num_finished_requests,
            num_generated_tokens=self.num_generated_tokens,
        )
        for ws in self.workers:
            kv = ws.kv
            stats.num_running += len(ws.sched.running)
            stats.num_waiting += len(ws.sched.waiting)
            stats.num_swapped += len(ws.sched.swapped)
            stats.num_steps += ws.num_steps
            stats.num_preemptions += sum(ws.sched.num_preemptions.values())
            stats.prefix_query_tokens += kv.num_query_tokens
            stats.prefix_hit_tokens += kv.num_hit_tokens
            stats.workers.append(scheduler_pb2.WorkerStats(
                worker_id=ws.handle.name,
                num_blocks=kv.gpu.num_blocks,
                num_free_blocks=kv.gpu.num_free_blocks,
                num_cached_blocks=kv.gpu.num_cached_free_blocks,
                num_swap_blocks=kv.cpu.num_blocks if kv.has_swap else 0,
                num_free_swap_blocks=kv.cpu.num_free_blocks if kv.has_swap else 0,
                healthy=ws.healthy,
                num_steps=ws.num_steps,
            ))
        return stats

