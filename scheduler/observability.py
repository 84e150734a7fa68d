"""Wires the engine to its metrics and to the periodic INFO stats line.

``SchedulerObserver`` owns the scheduler's ``SchedulerMetrics`` and reaches the engine two ways:

- **push**: it is one of the engine's observers (``scheduler.events.EngineObserver``, given to the
  ``Engine`` at construction): ``on_placement``, ``on_step`` (a typed ``StepStats``) and
  ``on_finished``. Counters and histograms change only here, on the event loop.
- **pull**: gauges (queue sizes, per-worker blocks and KV usage, healthy workers) are read from
  ``Engine.stats()`` when Prometheus scrapes and before each stats line. The scrape runs on the
  metrics HTTP thread, so the read is handed to the event loop (engine state has no locks);
  a loop too busy to answer within ``_REFRESH_TIMEOUT_S`` leaves the previous values.

The kvstore hook: ``observer.metrics.kvstore_op("get")`` is a context manager that times one
kvstore call and counts its failure; ``scheduler/prefix_sync.py`` is given ``observer.metrics`` at
construction and wraps its I/O in it.
Never logs prompts: the stats line carries counts only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from pagedserve.core.metrics_server import MetricsServer, new_registry, serve_metrics
from protos.pagedserve.v1 import scheduler_pb2
from scheduler.events import StepStats
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.metrics import SchedulerMetrics
from scheduler.policy import StepPlan
from scheduler.sequence import SequenceGroup, SequenceStatus

if TYPE_CHECKING:
    from scheduler.engine import Engine

logger = logging.getLogger(__name__)

_REFRESH_TIMEOUT_S = 1.0


def finished_reason(group: SequenceGroup, error: BaseException | None) -> str:
    """One label per request: error > abort (any sequence aborted) > stop (any stopped) > length."""
    if error is not None:
        return "error"
    statuses = {seq.status for seq in group.seqs}
    if SequenceStatus.FINISHED_ABORTED in statuses or not all(s.is_finished for s in statuses):
        return "abort"
    return "stop" if SequenceStatus.FINISHED_STOPPED in statuses else "length"


def prompt_tokens_computed(plan: StepPlan) -> int:
    """Prompt positions whose K/V this step computed (a step has already advanced
    ``num_computed_tokens`` by ``num_new_tokens``). Cached prefix tokens are not computed.

        [ prompt ............ | output ... ]
                  [ computed this step )
                  ^ start      ^ num_prompt_tokens: prompt part = min(end, num_prompt) - start
    """
    total = 0
    for item in plan.scheduled:
        end = item.seq.num_computed_tokens
        start = end - item.num_new_tokens
        total += max(0, min(end, item.seq.num_prompt_tokens) - start)
    return total


class _RefreshOnCollect(Collector):
    """Registered before the metric families, so a scrape refreshes the gauges first."""

    def __init__(self, refresh: Callable[[], object]) -> None:
        self._refresh = refresh

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        self._refresh()
        return []


class SchedulerObserver:
    """Owns the scheduler's metrics registry, its /metrics server and the stats-line task.
    Built before the engine (which takes it as an observer); ``start`` gives it the engine to
    read gauges from.

    Invariant: counters are only changed by engine events, on the event loop; gauges are only
    set from ``Engine.stats()``, on the event loop too (``refresh`` hands itself over).
    """

    def __init__(self, log_interval_s: float = 10.0,
                 registry: CollectorRegistry | None = None) -> None:
        self.engine: Engine | None = None  # from ``start``
        self.log_interval_s = log_interval_s
        self.registry = registry if registry is not None else new_registry()
        self.registry.register(_RefreshOnCollect(self.refresh))
        self.metrics = SchedulerMetrics(self.registry)
        self.server: MetricsServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log_task: asyncio.Task[None] | None = None
        # Requests already counted for queue time (by object: a finished request's last step
        # event comes after its "finished" event).
        self._scheduled: weakref.WeakSet[SequenceGroup] = weakref.WeakSet()
        self._prefix_seen: weakref.WeakKeyDictionary[KVCacheManager, tuple[int, int]] = (
            weakref.WeakKeyDictionary())
        self._num_prompt_tokens = 0  # totals for the stats line's throughput
        self._num_generated_tokens = 0
        self._last_log: tuple[float, int, int] | None = None  # (time, prompt, generated)
        self._step_seconds = 0.0  # totals for the stats line's share of worker forward time
        self._forward_seconds = 0.0
        self._last_time_split = (0.0, 0.0)

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, engine: Engine, metrics_port: int | None, host: str = "127.0.0.1") -> None:
        """After ``engine.start()``: label aliases with the model, serve /metrics
        (``metrics_port`` None = no endpoint, 0 = a free port), start the stats line."""
        self.engine = engine
        self._loop = asyncio.get_running_loop()
        self.metrics.set_model_name(engine.model_info.model)
        if metrics_port is not None:
            self.server = serve_metrics(metrics_port, self.registry, host)
            logger.info("scheduler metrics on %s", self.server.url)
        if self.log_interval_s > 0:
            self._log_task = self._loop.create_task(self._log_loop(), name="scheduler-stats-log")

    async def stop(self) -> None:
        if self._log_task is not None:
            self._log_task.cancel()
            await asyncio.gather(self._log_task, return_exceptions=True)
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)

    @property
    def metrics_port(self) -> int | None:
        return self.server.port if self.server is not None else None

    # ---- push: engine events (scheduler.events.EngineObserver) --------------------------------
    def on_placement(self, worker: str, reason: str) -> None:
        self.metrics.placed(reason)

    def on_step(self, stats: StepStats) -> None:
        num_prompt = prompt_tokens_computed(stats.plan)
        self.metrics.step_finished(stats.seconds, num_prompt, stats.num_generated_tokens)
        self._num_prompt_tokens += num_prompt
        self._num_generated_tokens += stats.num_generated_tokens
        self._step_seconds += stats.seconds
        self._forward_seconds += stats.forward_seconds
        for _group, mode in stats.preempted:
            self.metrics.preempted(mode)
        self._observe_queue_times(stats.plan, time.monotonic() - stats.seconds)
        self._count_prefix_lookups(stats.worker)

    def on_finished(self, group: SequenceGroup, error: BaseException | None) -> None:
        self.metrics.request_finished(finished_reason(group, error))

    def _observe_queue_times(self, plan: StepPlan, step_started: float) -> None:
        """Submitted -> first scheduled, once per request (re-admission after preemption or a
        worker failure does not count again)."""
        for item in plan.scheduled:
            group = item.group
            if group not in self._scheduled:
                self._scheduled.add(group)
                self.metrics.observe_queue_time(max(0.0, step_started - group.arrival_time))

    def _count_prefix_lookups(self, worker: str) -> None:
        """The KV managers count lookups cumulatively; a failed worker gets a fresh manager,
        so deltas are taken per manager object to keep the counters monotonic."""
        if self.engine is None:
            return
        for ws in self.engine.workers:
            if ws.handle.name != worker:
                continue
            kv = ws.kv
            queried, hit = self._prefix_seen.get(kv, (0, 0))
            if kv.num_query_tokens > queried:
                self.metrics.prefix_cache_lookup(kv.num_query_tokens - queried,
                                                 kv.num_hit_tokens - hit)
                self._prefix_seen[kv] = (kv.num_query_tokens, kv.num_hit_tokens)

    # ---- pull: gauges ------------------------------------------------------------------------
    def refresh(self) -> scheduler_pb2.SchedulerStats | None:
        """Set the gauges from ``Engine.stats()``; from another thread, on the engine's loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return None
        if _on_loop(loop):
            return self._refresh_now()
        done: concurrent.futures.Future[scheduler_pb2.SchedulerStats] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(self._refresh_now())
            except Exception as exc:  # noqa: BLE001 - handed to the scrape thread, not swallowed
                done.set_exception(exc)

        try:
            loop.call_soon_threadsafe(run)
            return done.result(timeout=_REFRESH_TIMEOUT_S)
        except (RuntimeError, concurrent.futures.TimeoutError):
            logger.debug("metrics refresh skipped: event loop busy or stopped")
            return None

    def _refresh_now(self) -> scheduler_pb2.SchedulerStats:
        assert self.engine is not None, "refreshed only once started (``_loop`` is set)"
        stats = self.engine.stats()
        self.metrics.set_queue_sizes(stats.num_running, stats.num_waiting, stats.num_swapped)
        self.metrics.set_workers_healthy(sum(1 for w in stats.workers if w.healthy))
        for w in stats.workers:
            self.metrics.set_worker_blocks(w.worker_id, w.num_blocks, w.num_free_blocks,
                                           w.num_cached_blocks, w.num_swap_blocks,
                                           w.num_free_swap_blocks)
        return stats

    # ---- the periodic INFO line --------------------------------------------------------------
    async def _log_loop(self) -> None:
        while True:
            await asyncio.sleep(self.log_interval_s)
            try:
                self.log_stats()
            except Exception:  # the stats line must never stop the scheduler
                logger.exception("stats line failed")

    def log_stats(self) -> None:
        """One INFO line: throughput since the last line, queues, KV usage per worker, prefix
        hit rate (cumulative, in tokens), and the share of step time the workers spent in their
        forward pass since the last line (the rest is scheduling, transport and sampling)."""
        stats = self._refresh_now()
        now = time.monotonic()
        prompt, generated = self._num_prompt_tokens, self._num_generated_tokens
        last = self._last_log or (now, prompt, generated)
        self._last_log = (now, prompt, generated)
        elapsed = max(now - last[0], 1e-9)
        kv = ", ".join(f"{w.worker_id}={_usage(w):.1%}" for w in stats.workers) or "-"
        hit_rate = stats.prefix_hit_tokens / stats.prefix_query_tokens if (
            stats.prefix_query_tokens) else 0.0
        step_s = self._step_seconds - self._last_time_split[0]
        forward_s = self._forward_seconds - self._last_time_split[1]
        self._last_time_split = (self._step_seconds, self._forward_seconds)
        logger.info(
            "prompt throughput %.1f tokens/s, generation throughput %.1f tokens/s, "
            "running %d, waiting %d, swapped %d, KV usage %s, prefix cache hit rate %.1f%%, "
            "worker forward %.1f%% of step time",
            (prompt - last[1]) / elapsed, (generated - last[2]) / elapsed,
            stats.num_running, stats.num_waiting, stats.num_swapped, kv, 100.0 * hit_rate,
            100.0 * forward_s / step_s if step_s > 0 else 0.0)


def _usage(w: scheduler_pb2.WorkerStats) -> float:
    return (w.num_blocks - w.num_free_blocks) / w.num_blocks if w.num_blocks else 0.0


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


__all__ = ["SchedulerObserver", "finished_reason", "prompt_tokens_computed"]
