"""Worker metrics: the memory a worker owns (KV and swap pools, device memory) and step timing.

Built into a ``CollectorRegistry`` the caller owns (tests pass a fresh one); ``worker/server.py``
serves it with ``pagedserve.core.metrics_server``. The scheduler decides which block holds what, so
the worker exports pool *capacity* only; used / cached-free / free blocks and KV usage per
worker come from the scheduler (``pagedserve_scheduler_kv_blocks{worker,state}``,
``pagedserve_scheduler_swap_blocks{worker,state}``, ``pagedserve_scheduler_kv_cache_usage_ratio``).

Device memory is read at scrape time. On CUDA it is torch's caching allocator (allocated,
reserved, peak allocated, device capacity). On CPU there is no device allocator, so the same
gauges describe the process: allocated = reserved = resident set size, peak = peak RSS
(``getrusage``), total = physical memory (psutil when installed, else ``/proc`` and ``sysconf``).
No vLLM aliases live here: vLLM's engine-level names are exported once, by the scheduler.
One worker process is one scrape target, so per-worker series are told apart by the
target's ``instance``/``pod`` labels rather than a label of their own. A tensor-parallel group is
several processes (``worker/parallel.py``): every series carries the process's ``rank`` (0 for a
whole worker and for a group's leader), ``pagedserve_worker_tensor_parallel_size`` says how many
ranks its group has, and ``pagedserve_worker_model_weight_bytes{rank}`` shows how the weights
split (the leader also holds the logits projection).
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

PREFIX = "pagedserve_worker"

FORWARD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1,
                   0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
SAMPLING_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25)

RANK = ("rank",)  # the label every worker series carries

#: No vLLM aliases on the worker (see module docstring); kept for a uniform interface.
VLLM_NAME_MAP: dict[str, str] = {}


class WorkerMetrics:
    """Owns the worker's metric objects inside one registry.

    Invariant: pool gauges are capacities set once after sizing; the worker never tracks
    which block is used (that is the scheduler's metadata).
    """

    def __init__(self, registry: CollectorRegistry, worker_id: str = "",
                 device: Any = "cpu", rank: int = 0, tensor_parallel_size: int = 1) -> None:
        self._worker_id = worker_id
        self._device = device
        self._rank = str(rank)
        registry.register(_SampleOnCollect(self))  # before the gauges: fresh at every scrape
        self._build_pools(registry)
        self._build_device(registry)
        self._build_steps(registry)
        self.attention_backend = Info(
            f"{PREFIX}_attention_backend", "Attention backend in use.", RANK,
            registry=registry).labels(self._rank)
        self.cpu_kernels = Info(
            f"{PREFIX}_cpu_kernels",
            "Fused CPU kernel variant in use (isa: avx512, avx2, portable; off = torch ops; "
            "none = not a CPU worker), the variants this CPU can run (available) and how the "
            "projection weights are held (weights: codes = exact 8-bit codes, fp32 = fp32 "
            "panels, mixed, torch = the model's own tensors).",
            RANK, registry=registry).labels(self._rank)
        self.tensor_parallel_size = Gauge(
            f"{PREFIX}_tensor_parallel_size",
            "Ranks of this worker's tensor-parallel group (1: a whole worker).", RANK,
            registry=registry).labels(self._rank)
        self.tensor_parallel_size.set(tensor_parallel_size)

    def _build_pools(self, r: CollectorRegistry) -> None:
        def gauge(name: str, doc: str) -> Any:
            return Gauge(f"{PREFIX}_{name}", doc, RANK, registry=r).labels(self._rank)

        self.kv_blocks_total = gauge("kv_blocks_total", "GPU KV blocks in the pool.")
        self.swap_blocks_total = gauge("swap_blocks_total", "CPU swap blocks in the pool.")
        self.sequences = gauge("sequences", "Sequences the worker holds state for.")

    def _build_device(self, r: CollectorRegistry) -> None:
        def gauge(name: str, doc: str) -> Any:
            return Gauge(f"{PREFIX}_{name}_bytes", doc, RANK, registry=r).labels(self._rank)

        self.device_memory_allocated = gauge("device_memory_allocated", "Allocated by tensors.")
        self.device_memory_reserved = gauge("device_memory_reserved", "Reserved by the allocator.")
        self.device_memory_peak = gauge("device_memory_peak", "Peak allocated since start.")
        self.device_memory_total = gauge("device_memory_total", "Device memory capacity.")
        self.weight_bytes = gauge("model_weight", "Bytes of model weights on the device "
                                  "(this rank's slice in a tensor-parallel group).")

    def _build_steps(self, r: CollectorRegistry) -> None:
        rank = self._rank
        self.forward_duration = Histogram(
            f"{PREFIX}_forward_duration_seconds", "Model forward time of one step.", RANK,
            buckets=FORWARD_BUCKETS, registry=r).labels(rank)
        self.sampling_duration = Histogram(
            f"{PREFIX}_sampling_duration_seconds", "Sampling time of one step.", RANK,
            buckets=SAMPLING_BUCKETS, registry=r).labels(rank)
        self.computed_tokens = Counter(f"{PREFIX}_computed_tokens",
                                       "Tokens run through the model.", RANK,
                                       registry=r).labels(rank)
        self.sampled_tokens = Counter(f"{PREFIX}_sampled_tokens", "Tokens sampled.", RANK,
                                      registry=r).labels(rank)

    def set_backend(self, backend: str, device: str) -> None:
        self.attention_backend.info(
            {"backend": backend, "device": device, "worker_id": self._worker_id})

    def set_cpu_kernels(self, isa: str, available: Iterable[str], weights: str = "torch") -> None:
        """Once at start (``worker/cpu_kernels.py``); ``available`` is exported comma-joined;
        ``weights``: ``Execution.weight_format``."""
        self.cpu_kernels.info({"isa": isa, "available": ",".join(available), "weights": weights})

    def set_pools(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        """Pool capacities, once after profiling."""
        self.kv_blocks_total.set(num_gpu_blocks)
        self.swap_blocks_total.set(num_cpu_blocks)

    def set_weight_bytes(self, num_bytes: int) -> None:
        self.weight_bytes.set(num_bytes)

    def set_device_memory(self, allocated: int, reserved: int, peak: int, total: int) -> None:
        self.device_memory_allocated.set(allocated)
        self.device_memory_reserved.set(reserved)
        self.device_memory_peak.set(peak)
        self.device_memory_total.set(total)

    def sample_device_memory(self, device: Any = None) -> None:
        """Read torch's CUDA allocator stats, or the process's memory on CPU (module doc)."""
        import torch  # local: metrics stay importable (and cheap) without touching CUDA

        dev = torch.device(self._device if device is None else device)
        if dev.type != "cuda":
            rss = _process_rss_bytes()
            self.set_device_memory(allocated=rss, reserved=rss, peak=max(rss, _peak_rss_bytes()),
                                   total=_physical_memory_bytes())
            return
        self.set_device_memory(
            allocated=torch.cuda.memory_allocated(dev),
            reserved=torch.cuda.memory_reserved(dev),
            peak=torch.cuda.max_memory_allocated(dev),
            total=torch.cuda.get_device_properties(dev).total_memory)

    def step_finished(self, forward_s: float, sampling_s: float) -> None:
        self.forward_duration.observe(forward_s)
        self.sampling_duration.observe(sampling_s)

    def observe_step(self, num_tokens: int, num_sampled: int, forward_s: float,
                     num_seqs: int, sampling_s: float | None = None) -> None:
        """Per step (worker.py): tokens computed and sampled, forward and sampling time, live
        sequences. Device memory is read at scrape time, not here (off the hot path)."""
        self.computed_tokens.inc(num_tokens)
        self.sampled_tokens.inc(num_sampled)
        self.forward_duration.observe(forward_s)
        if sampling_s is not None:
            self.sampling_duration.observe(sampling_s)
        self.sequences.set(num_seqs)


class _SampleOnCollect(Collector):
    """Refreshes the device-memory gauges when the registry is collected; exports nothing."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        try:
            self._metrics.sample_device_memory()
        except Exception:  # a scrape must never fail because memory could not be read
            logger.debug("device memory sample failed", exc_info=True)
        return []


def _process_rss_bytes() -> int:
    try:
        import psutil  # optional

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _physical_memory_bytes() -> int:
    try:
        import psutil  # optional

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
