"""``pagedserve bench scheduler``: scheduler CPU per step, with nothing else in the step.

``num_seqs`` requests run against ``InstantWorker``, an in-process worker whose ``step`` returns
one token per ``sample=true`` sequence at once. Each step of the engine (schedule -> build the
delta -> process sampled tokens, i.e. ``Engine._step`` minus the worker) is timed with
``time.process_time`` (CPU) and ``time.perf_counter`` (wall), and the worker's own time is
subtracted. Only steps where every sequence decodes are reported (prefill steps are a handful).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from pagedserve.core.sampling import make_sampling_params, resolve_sampling_params
from pagedserve.core.step import WorkerResult, WorkerStep
from protos.pagedserve.v1 import worker_pb2
from scheduler.config import BatchingConfig, CacheConfig, SchedulerConfig
from scheduler.engine import Engine
from scheduler.worker_handle import InProcessWorkerHandle

TARGET_US = 1000.0


class InstantWorker:
    """Answers every step immediately: token 7 for each sequence that samples. Records how long
    its own ``step`` took so the benchmark can leave it out."""

    def __init__(self, num_gpu_blocks: int, block_size: int = 16, vocab_size: int = 32000) -> None:
        self.num_gpu_blocks = num_gpu_blocks
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.cpu_seconds = 0.0
        self.wall_seconds = 0.0
        self.last_num_scheduled = 0
        self.last_all_decode = False

    def info(self) -> worker_pb2.WorkerInfo:
        return worker_pb2.WorkerInfo(
            worker_id="instant", model="instant", num_gpu_blocks=self.num_gpu_blocks,
            num_cpu_blocks=0, block_size=self.block_size, max_model_len=1 << 20,
            vocab_size=self.vocab_size, eos_token_ids=[0], device="none",
            attention_backend="none", instance_id="instant")

    def reset(self) -> None:
        return None

    def step(self, step: WorkerStep) -> WorkerResult:
        cpu, wall = time.process_time(), time.perf_counter()
        batch = step.scheduled
        seq_ids = [s for s, sample in zip(batch.seq_ids, batch.sample, strict=True) if sample]
        response = WorkerResult(step.step_id, seq_ids, [7] * len(seq_ids),
                                [-0.5] * len(seq_ids))
        self.last_num_scheduled = len(batch.seq_ids)
        self.last_all_decode = all(n == 1 for n in batch.num_new_tokens)
        self.cpu_seconds += time.process_time() - cpu
        self.wall_seconds += time.perf_counter() - wall
        return response


class _DirectHandle(InProcessWorkerHandle):
    """No thread hop: the benchmark measures the scheduler, not ``asyncio.to_thread``."""

    async def step(self, step: WorkerStep) -> WorkerResult:
        return self.worker.step(step)


@dataclass
class OverheadResult:
    num_seqs: int
    cpu_us: list[float]
    wall_us: list[float]

    def summary(self, values: list[float]) -> tuple[float, float, float]:
        ordered = sorted(values)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        return statistics.fmean(values), statistics.median(values), p99


def run_scheduler_overhead(num_seqs: int = 256, prompt_len: int = 128, steps: int = 500,
                           enable_prefix_caching: bool = True) -> OverheadResult:
    return asyncio.run(_run(num_seqs, prompt_len, steps, enable_prefix_caching))


async def _run(num_seqs: int, prompt_len: int, steps: int, caching: bool) -> OverheadResult:
    bs = 16
    blocks_per_seq = -(-(prompt_len + steps + 8) // bs) + 1
    worker = InstantWorker(num_seqs * blocks_per_seq + 64, bs)
    config = SchedulerConfig(
        batching=BatchingConfig(max_num_batched_tokens=max(2048, num_seqs * prompt_len),
                                max_num_seqs=num_seqs, max_waiting_requests=1 << 20),
        cache=CacheConfig(enable_prefix_caching=caching))
    engine = Engine(config, [_DirectHandle(worker, "instant")])
    await engine.start()
    ws = engine.workers[0]
    if ws.task is not None:
        ws.task.cancel()  # this benchmark drives the steps itself
    for i in range(num_seqs):
        prompt = [(i * 131 + j) % 31000 + 1 for j in range(prompt_len)]
        params = resolve_sampling_params(
            make_sampling_params(max_tokens=steps + 4, temperature=0.0, ignore_eos=True),
            num_prompt_tokens=prompt_len, max_model_len=1 << 20, max_tokens_limit=1 << 20)
        engine.submit(f"r{i}", prompt, params)
    cpu_us: list[float] = []
    wall_us: list[float] = []
    while len(cpu_us) < steps:
        worker.cpu_seconds = worker.wall_seconds = 0.0
        cpu, wall = time.process_time(), time.perf_counter()
        await engine._step(ws)
        cpu_step = time.process_time() - cpu - worker.cpu_seconds
        wall_step = time.perf_counter() - wall - worker.wall_seconds
        if worker.last_all_decode and worker.last_num_scheduled == num_seqs:
            cpu_us.append(cpu_step * 1e6)
            wall_us.append(wall_step * 1e6)
    await engine.stop()
    return OverheadResult(num_seqs, cpu_us, wall_us)


def format_result(result: OverheadResult) -> str:
    cpu = result.summary(result.cpu_us)
    wall = result.summary(result.wall_us)
    verdict = "meets" if cpu[0] < TARGET_US else "misses"
    return "\n".join([
        (f"scheduler per decode step, {result.num_seqs} running sequences, instant worker, "
        f"{len(result.cpu_us)} steps"),
        f"  CPU  us: mean {cpu[0]:.0f}  p50 {cpu[1]:.0f}  p99 {cpu[2]:.0f}",
        f"  wall us: mean {wall[0]:.0f}  p50 {wall[1]:.0f}  p99 {wall[2]:.0f}",
        (f"  {verdict} the target of {TARGET_US:.0f} us/step "
        f"({TARGET_US / cpu[0]:.2f}x headroom; {cpu[0] / result.num_seqs:.2f} us per sequence)"),
    ])
