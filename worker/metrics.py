"""Worker metrics: the memory a worker owns (KV and swap pools, device memory) and step timing.

Built into a ``CollectorRegistry`` the caller owns (tests pass a fresh one); ``worker/server.py``
serves it with ``pagedserve.metrics_server``. The scheduler decides which block holds what, so
KV *usage* comes from the scheduler (``pagedserve_scheduler_kv_cache_usage_ratio{worker}``);
the worker exports pool capacity, plus used/cached counts when the scheduler reports them.
No vLLM aliases live here: vLLM's engine-level names are exported once, by the scheduler.
One worker process is one scrape target, so per-worker series are told apart by the
target's ``instance``/``pod`` labels rather than a label of their own.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

PREFIX = "pagedserve_worker"

FORWARD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1,
                   0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
SAMPLING_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25)

#: No vLLM aliases on the worker (see module docstring); kept for a uniform interface.
VLLM_NAME_MAP: dict[str, str] = {}


class WorkerMetrics:
    """Owns the worker's metric objects inside one registry.

    Invariant: ``kv_blocks_used + kv_blocks_cached_free <= kv_blocks_total`` whenever the
    scheduler's last report is applied; the worker does not re-derive these numbers.
    """

    def __init__(self, registry: CollectorRegistry, worker_id: str = "",
                 device: Any = "cpu") -> None:
        self._worker_id = worker_id
        self._device = device
        self._build_pools(registry)
        self._build_device(registry)
        self._build_steps(registry)
        self.attention_backend = Info(
            f"{PREFIX}_attention_backend", "Attention backend in use.", registry=registry)

    def _build_pools(self, r: CollectorRegistry) -> None:
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, registry=r)

        self.kv_blocks_total = gauge("kv_blocks_total", "GPU KV blocks in the pool.")
        self.kv_blocks_used = gauge("kv_blocks_used", "GPU KV blocks referenced by a sequence.")
        self.kv_blocks_cached_free = gauge(
            "kv_blocks_cached_free", "Free GPU KV blocks still holding a reusable cached prefix.")
        self.swap_blocks_total = gauge("swap_blocks_total", "CPU swap blocks in the pool.")
        self.swap_blocks_used = gauge("swap_blocks_used", "CPU swap blocks holding swapped KV.")
        self.sequences = gauge("sequences", "Sequences the worker holds state for.")

    def _build_device(self, r: CollectorRegistry) -> None:
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"{PREFIX}_{name}_bytes", doc, registry=r)

        self.device_memory_allocated = gauge("device_memory_allocated", "Allocated by tensors.")
        self.device_memory_reserved = gauge("device_memory_reserved", "Reserved by the allocator.")
        self.device_memory_peak = gauge("device_memory_peak", "Peak allocated since start.")
        self.device_memory_total = gauge("device_memory_total", "Device memory capacity.")
        self.weight_bytes = gauge("model_weight", "Bytes of model weights on the device.")

    def _build_steps(self, r: CollectorRegistry) -> None:
        self.forward_duration = Histogram(
            f"{PREFIX}_forward_duration_seconds", "Model forward time of one step.",
            buckets=FORWARD_BUCKETS, registry=r)
        self.sampling_duration = Histogram(
            f"{PREFIX}_sampling_duration_seconds", "Sampling time of one step.",
            buckets=SAMPLING_BUCKETS, registry=r)
        self.computed_tokens = Counter(f"{PREFIX}_computed_tokens",
                                       "Tokens run through the model.", registry=r)
        self.sampled_tokens = Counter(f"{PREFIX}_sampled_tokens", "Tokens sampled.", registry=r)

    def set_backend(self, backend: str, device: str) -> None:
        self.attention_backend.info(
            {"backend": backend, "device": device, "worker_id": self._worker_id})

    def set_pools(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        """Pool capacities, once after profiling."""
        self.kv_blocks_total.set(num_gpu_blocks)
        self.swap_blocks_total.set(num_cpu_blocks)

    def set_kv_blocks(self, total: int, used: int, cached_free: int) -> None:
        self.kv_blocks_total.set(total)
        self.kv_blocks_used.set(used)
        self.kv_blocks_cached_free.set(cached_free)

    def set_swap_blocks(self, total: int, used: int) -> None:
        self.swap_blocks_total.set(total)
        self.swap_blocks_used.set(used)

    def set_weight_bytes(self, num_bytes: int) -> None:
        self.weight_bytes.set(num_bytes)

    def set_device_memory(self, allocated: int, reserved: int, peak: int, total: int) -> None:
        self.device_memory_allocated.set(allocated)
        self.device_memory_reserved.set(reserved)
        self.device_memory_peak.set(peak)
        self.device_memory_total.set(total)

    def sample_device_memory(self, device: Any = None) -> None:
        """Read torch's CUDA allocator stats; a CPU device leaves the gauges as they are."""
        import torch  # local: metrics stay importable (and cheap) without touching CUDA

        dev = torch.device(self._device if device is None else device)
        if dev.type != "cuda":
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
                     num_seqs: int) -> None:
        """Per step (worker.py): tokens computed and sampled, forward time, live sequences."""
        self.computed_tokens.inc(num_tokens)
        self.sampled_tokens.inc(num_sampled)
        self.forward_duration.observe(forward_s)
        self.sequences.set(num_seqs)
        self.sample_device_memory()
