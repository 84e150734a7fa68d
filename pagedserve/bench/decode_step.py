"""Time one full decode step of a model (default: the packaged SmolLM2) on a worker: ``batch``
sequences with ``context`` tokens each, one new token per sequence, sampling included. On CUDA
it compares the Triton and torch attention backends; on CPU it times the torch backend.

    python -m pagedserve.bench.decode_step [--batch 64] [--context 512] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

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
        ids = torch.randint(10, 1000, (context,), generator=gen).tolist()
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


def _check(result: WorkerResult, batch: int) -> None:
    if len(result) != batch:
        raise RuntimeError(f"{len(result)} of {batch} sequences sampled")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedserve.bench.decode_step")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    backends = ["triton", "torch"] if args.device.startswith("cuda") else ["torch"]
    blocks = args.batch * -(-(args.context + args.iters + 1) // 16)
    print(f"decode step: batch {args.batch}, context {args.context}, device {args.device}")
    print(f"{'backend':<8} {'median ms':>10} {'tokens/s':>10}")
    for backend in backends:
        times = time_decode(_worker(args.model, args.device, backend, blocks, args.dtype),
                            args.batch, args.context, args.iters)
        med = statistics.median(times)
        print(f"{backend:<8} {med * 1e3:>10.2f} {args.batch / med:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
