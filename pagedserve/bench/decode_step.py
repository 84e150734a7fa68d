"""Time one full decode step of a model (default: the packaged SmolLM2) on a worker: ``batch``
sequences with ``context`` tokens each, one new token per sequence, sampling included. On CUDA
it compares the Triton and torch attention backends; on CPU it times the torch backend.

    python -m pagedserve.bench.decode_step [--batch 64] [--context 512] [--device cuda]

``--weights`` (CPU) compares how the projections are held at each batch size: exact 8-bit codes
(the default for weights from a GGUF quantization) against fp32 panels
(``PAGEDSERVE_CPU_WEIGHT_CODES=0``), in one invocation, alternating:

    python -m pagedserve.bench.decode_step --weights --batch 1,8,64 --context 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch

from pagedserve.core.step import NewSeq, ScheduledBatch, ScheduledRow, WorkerResult, WorkerStep
from protos.pagedserve.v1 import common_pb2
from worker.config import BatchConfig, CacheConfig, LoadConfig, ServerConfig, WorkerConfig
from worker.worker import Worker


def _worker(model: str | None, device: str, backend: str, num_blocks: int, dtype: str) -> Worker:
    return Worker(WorkerConfig(
        load=LoadConfig(model, dtype, device, backend),
        cache=CacheConfig(block_size=16, num_gpu_blocks=num_blocks, swap_space_gib=0),
        batch=BatchConfig(max_num_batched_tokens=8192, max_num_seqs=1024),
        server=ServerConfig(worker_id=f"bench-{backend}"), seed=0))


def time_decode(worker: Worker, batch: int, context: int, iters: int) -> list[float]:
    """Prefills ``batch`` sequences to ``context`` tokens, then times ``iters`` decode steps."""
    bs = 16
    blocks_per_seq = -(-(context + iters + 1) // bs)
    greedy = common_pb2.SamplingParams(temperature=0.0, max_tokens=iters + 1)
    gen = torch.Generator().manual_seed(0)
    new_seqs, rows = [], []
    for s in range(batch):
        ids = torch.randint(10, min(1000, worker.model_config.vocab_size), (context,),
                            generator=gen).tolist()
        table = list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq))
        new_seqs.append(NewSeq(s + 1, ids, context, greedy))
        rows.append(ScheduledRow(seq_id=s + 1, num_computed_tokens=0, num_new_tokens=context,
                                 sample=True, new_block_ids=table))
    _check(worker.step(WorkerStep(1, new_seqs, ScheduledBatch.from_rows(rows))), batch)
    times = []
    for i in range(iters):  # the worker appended each sampled token itself
        step = WorkerStep(i + 2, scheduled=ScheduledBatch.from_rows(ScheduledRow(
            seq_id=s + 1, num_computed_tokens=context + i, num_new_tokens=1, sample=True)
            for s in range(batch)))
        if worker.placement.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        _check(worker.step(step), batch)
        times.append(time.perf_counter() - started)
    return times[1:] if len(times) > 1 else times


@dataclass(frozen=True)
class WeightsResult:
    batch: int
    codes_ms: float  # median decode step, projections as 8-bit codes
    fp32_ms: float  # the same with fp32 panels
    codes_weight_bytes: int
    fp32_weight_bytes: int


def run_weights(model: str | None = None, batches: tuple[int, ...] = (1, 8, 64),
                context: int = 200, iters: int = 8, repeat: int = 2) -> list[WeightsResult]:
    """Decode-step medians with the projections as codes and as fp32 panels, per batch size;
    each (batch, format) timed ``repeat`` times, alternating, keeping the faster."""
    from worker.kernels import cpu_ops

    blocks = max(batches) * -(-(context + iters + 1) // 16)
    best: dict[tuple[int, bool], float] = {}
    weight_bytes: dict[bool, int] = {}
    saved = os.environ.get(cpu_ops.ENV_CODES)
    try:
        for _ in range(repeat):
            for codes in (True, False):
                os.environ[cpu_ops.ENV_CODES] = "1" if codes else "0"
                worker = _worker(model, "cpu", "torch", blocks, "auto")
                weight_bytes[codes] = worker.weight_bytes
                for batch in batches:
                    med = statistics.median(time_decode(worker, batch, context, iters))
                    best[batch, codes] = min(best.get((batch, codes), med), med)
                    worker.reset()  # the next batch starts from an empty pool
                worker.close()
    finally:
        if saved is None:
            os.environ.pop(cpu_ops.ENV_CODES, None)
        else:
            os.environ[cpu_ops.ENV_CODES] = saved
    return [WeightsResult(b, best[b, True] * 1e3, best[b, False] * 1e3, weight_bytes[True],
                          weight_bytes[False]) for b in batches]


def format_weights(results: list[WeightsResult]) -> str:
    first = results[0]
    lines = [f"weights: codes {first.codes_weight_bytes / 2**20:.0f} MiB, fp32 panels "
             f"{first.fp32_weight_bytes / 2**20:.0f} MiB",
             f"{'batch':>5} {'codes ms':>9} {'fp32 ms':>9} {'speed-up':>9}"]
    lines += [f"{r.batch:>5} {r.codes_ms:>9.2f} {r.fp32_ms:>9.2f} {r.fp32_ms / r.codes_ms:>8.2f}x"
              for r in results]
    return "\n".join(lines)


def _check(result: WorkerResult, batch: int) -> None:
    if len(result) != batch:
        raise RuntimeError(f"{len(result)} of {batch} sequences sampled")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedserve.bench.decode_step")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", default="64", help="batch size(s), comma-separated")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--weights", action="store_true",
                        help="CPU: projections as 8-bit codes vs fp32 panels, per batch size")
    args = parser.parse_args(argv)
    batches = tuple(int(b) for b in str(args.batch).split(","))
    if args.weights:
        print(format_weights(run_weights(args.model, batches, args.context, args.iters)))
        return 0
    backends = ["triton", "torch"] if args.device.startswith("cuda") else ["torch"]
    for batch in batches:
        blocks = batch * -(-(args.context + args.iters + 1) // 16)
        print(f"decode step: batch {batch}, context {args.context}, device {args.device}")
        print(f"{'backend':<8} {'median ms':>10} {'tokens/s':>10}")
        for backend in backends:
            times = time_decode(_worker(args.model, args.device, backend, blocks, args.dtype),
                                batch, args.context, args.iters)
            med = statistics.median(times)
            print(f"{backend:<8} {med * 1e3:>10.2f} {batch / med:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
