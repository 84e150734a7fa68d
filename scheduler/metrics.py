"""Scheduler metrics: engine state (queues, KV usage, preemption, prefix cache, placement).

The scheduler is the single owner of block metadata, so it exports the engine-level vLLM
names (``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``, token and preemption
counters). Per-step values are set once per step from already-computed counts; nothing
here walks block tables.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pagedserve.core.metrics_server import AliasCollector

PREFIX = "pagedserve_scheduler"

PREEMPTION_MODES = ("swap", "recompute")
FINISHED_REASONS = ("stop", "length", "abort", "error")
#: Placement reasons (``scheduler/placement.py``); others are accepted but should be added here.
PLACEMENT_REASONS = ("prefix", "least_loaded", "only")
#: ``state`` label values of the per-worker block gauges (they sum to the pool size).
KV_BLOCK_STATES = ("used", "cached_free", "free")
SWAP_BLOCK_STATES = ("used", "free")

STEP_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                         0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
QUEUE_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                      10.0, 30.0, 60.0, 120.0)
STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
KVSTORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0)

#: vLLM name -> pagedserve name (exposed names: counters with ``_total``).
VLLM_NAME_MAP: dict[str, str] = {
    "vllm:num_requests_running": f"{PREFIX}_requests_running",
    "vllm:num_requests_waiting": f"{PREFIX}_requests_waiting",
    "vllm:num_requests_swapped": f"{PREFIX}_requests_swapped",
    "vllm:kv_cache_usage_perc": f"{PREFIX}_kv_cache_usage_ratio",
    "vllm:gpu_cache_usage_perc": f"{PREFIX}_kv_cache_usage_ratio",
    "vllm:num_preemptions_total": f"{PREFIX}_preemptions_total",
    "vllm:prefix_cache_queries_total": f"{PREFIX}_prefix_cache_queried_tokens_total",
    "vllm:prefix_cache_hits_total": f"{PREFIX}_prefix_cache_hit_tokens_total",
    "vllm:request_success_total": f"{PREFIX}_requests_finished_total",
    "vllm:prompt_tokens_total": f"{PREFIX}_prompt_tokens_total",
    "vllm:generation_tokens_total": f"{PREFIX}_generated_tokens_total",
    "vllm:iteration_tokens_total": f"{PREFIX}_step_tokens",
    "vllm:request_queue_time_seconds": f"{PREFIX}_request_queue_time_seconds",
}


class SchedulerMetrics:
    """Owns the scheduler's metric objects inside one registry.

    Invariant: gauges describe the state after the last finished step; counters only grow.
    """

    def __init__(self, registry: CollectorRegistry, model_name: str = "") -> None:
        self._build_state(registry)
        self._build_steps(registry)
        self._build_cache_and_placement(registry)
        aliased = [self.running, self.waiting, self.swapped, self.kv_usage, self.preemptions,
                   self.prefix_queried, self.prefix_hits, self.finished, self.prompt_tokens,
                   self.generated_tokens, self.step_tokens, self.queue_time]
        self._aliases = AliasCollector(
            aliased, VLLM_NAME_MAP, {"model_name": model_name} if model_name else None)
        registry.register(self._aliases)

    def set_model_name(self, model_name: str) -> None:
        """Label the ``vllm:*`` aliases with ``model_name`` (known only once workers answer)."""
        self._aliases.set_const_labels({"model_name": model_name} if model_name else {})

    def _build_state(self, r: CollectorRegistry) -> None:
        self.running = Gauge(f"{PREFIX}_requests_running", "Requests in the running batch.",
                             registry=r)
        self.waiting = Gauge(f"{PREFIX}_requests_waiting", "Requests waiting to be scheduled.",
                             registry=r)
        self.swapped = Gauge(f"{PREFIX}_requests_swapped", "Requests swapped out to CPU.",
                             registry=r)
        self.kv_usage = Gauge(f"{PREFIX}_kv_cache_usage_ratio",
                              "Fraction of a worker's GPU KV blocks in use (0-1).", ["worker"],
                              registry=r)
        self.kv_blocks = Gauge(f"{PREFIX}_kv_blocks",
                               "A worker's GPU KV blocks by state (used, cached_free, free).",
                               ["worker", "state"], registry=r)
        self.swap_blocks = Gauge(f"{PREFIX}_swap_blocks",
                                 "A worker's CPU swap blocks by state (used, free).",
                                 ["worker", "state"], registry=r)
        self.workers_healthy = Gauge(f"{PREFIX}_workers_healthy",
                                     "Workers currently registered and healthy.", registry=r)

    def _build_steps(self, r: CollectorRegistry) -> None:
        self.step_duration = Histogram(
            f"{PREFIX}_step_duration_seconds", "Wall time of one scheduling step incl. workers.",
            buckets=STEP_DURATION_BUCKETS, registry=r)
        self.step_tokens = Histogram(
            f"{PREFIX}_step_tokens", "Prompt tokens computed plus tokens sampled in one step.",
            buckets=STEP_TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens",
                                     "Prompt tokens computed (prefix-cache hits excluded).",
                                     registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens sampled.",
                                        registry=r)
        self.preemptions = Counter(f"{PREFIX}_preemptions", "Preempted sequence groups by mode.",
                                   ["mode"], registry=r)
        self.finished = Counter(f"{PREFIX}_requests_finished", "Finished requests by reason.",
                                ["finished_reason"], registry=r)
        self.queue_time = Histogram(
            f"{PREFIX}_request_queue_time_seconds", "Submitted to first scheduled step.",
            buckets=QUEUE_TIME_BUCKETS, registry=r)

    def _build_cache_and_placement(self, r: CollectorRegistry) -> None:
        self.prefix_queried = Counter(f"{PREFIX}_prefix_cache_queried_tokens",
                                      "Prompt tokens looked up in the prefix cache.", registry=r)
        self.prefix_hits = Counter(f"{PREFIX}_prefix_cache_hit_tokens",
                                   "Prompt tokens found in the prefix cache.", registry=r)
        self.placements = Counter(f"{PREFIX}_placements", "Request placements by reason.",
                                  ["reason"], registry=r)
        self.kvstore_duration = Histogram(
            f"{PREFIX}_kvstore_operation_duration_seconds", "kvstore call latency by operation.",
            ["op"], buckets=KVSTORE_BUCKETS, registry=r)
        self.kvstore_errors = Counter(f"{PREFIX}_kvstore_errors", "Failed kvstore calls.",
                                      ["op"], registry=r)

    def set_queue_sizes(self, running: int, waiting: int, swapped: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.swapped.set(swapped)

    def set_kv_usage(self, worker: str, ratio: float) -> None:
        self.kv_usage.labels(worker=worker).set(ratio)

    def set_worker_blocks(self, worker: str, total: int, free: int, cached_free: int,
                          swap_total: int = 0, swap_free: int = 0) -> None:
        """Per-worker pool state from the scheduler's metadata (``free`` includes cached-free)."""
        self.set_kv_usage(worker, (total - free) / total if total else 0.0)
        for state, value in (("used", total - free), ("cached_free", cached_free),
                             ("free", free - cached_free)):
            self.kv_blocks.labels(worker=worker, state=state).set(value)
        self.swap_blocks.labels(worker=worker, state="used").set(swap_total - swap_free)
        self.swap_blocks.labels(worker=worker, state="free").set(swap_free)

    def remove_worker(self, worker: str) -> None:
        """Drop a departed worker's series so dashboards stop showing its last value."""
        series: list[tuple[Gauge, tuple[str, ...]]] = [(self.kv_usage, (worker,))]
        series += [(self.kv_blocks, (worker, state)) for state in KV_BLOCK_STATES]
        series += [(self.swap_blocks, (worker, state)) for state in SWAP_BLOCK_STATES]
        for gauge, labels in series:
            try:
                gauge.remove(*labels)
            except KeyError:
                pass

    def set_workers_healthy(self, count: int) -> None:
        self.workers_healthy.set(count)

    def step_finished(self, duration_s: float, prompt_tokens: int, generated_tokens: int) -> None:
        """One call per step with the tokens it prefilled and sampled."""
        self.step_duration.observe(duration_s)
        self.step_tokens.observe(prompt_tokens + generated_tokens)
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated_tokens)

    def preempted(self, mode: str, count: int = 1) -> None:
        if mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption mode {mode!r} is not one of {PREEMPTION_MODES}")
        self.preemptions.labels(mode=mode).inc(count)

    def prefix_cache_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queried.inc(queried_tokens)
        self.prefix_hits.inc(hit_tokens)

    def observe_queue_time(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def placed(self, reason: str) -> None:
        self.placements.labels(reason=reason).inc()

    def request_finished(self, finished_reason: str) -> None:
        if finished_reason not in FINISHED_REASONS:
            raise ValueError(f"finished reason {finished_reason!r} is not one of "
                             f"{FINISHED_REASONS}")
        self.finished.labels(finished_reason=finished_reason).inc()

    @contextmanager
    def kvstore_op(self, op: str) -> Iterator[None]:
        """Time one kvstore call; an exception counts as an error and propagates."""
        start = time.perf_counter()
        try:
            yield
        except Exception:
            self.kvstore_errors.labels(op=op).inc()
            raise
        finally:
            self.kvstore_duration.labels(op=op).observe(time.perf_counter() - start)
