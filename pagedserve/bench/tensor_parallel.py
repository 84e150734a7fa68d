"""``pagedserve bench tensor-parallel``: one worker (TP=1) against a tensor-parallel group of two
ranks (TP=2) of the same model (default: the packaged SmolLM2), in one run: per-step latency of a
prefill and of a decode step, and the weight bytes each rank holds, as TP=2 / TP=1 ratios.

Both run as real ``python -m worker`` processes (a group: one per rank, gloo on loopback) and are
stepped the way the scheduler steps them (``Worker/Step`` over gRPC, the same typed steps), so the
figures include what a group adds: the step broadcast, an all-reduce after every row-parallel
projection and the samples' broadcast. Weight bytes come from each rank's
``pagedserve_worker_model_weight_bytes{rank}``. On a CPU with fewer cores than ranks expect no
speed-up: the point is the memory per rank and what the collectives cost.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.core.step import NewSeq, ScheduledBatch, ScheduledRow, WorkerStep
from pagedserve.core.step_codec import decode_result, encode_step
from pagedserve.up import free_port
from protos.pagedserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

BLOCK_SIZE = 16
GREEDY = common_pb2.SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class TpResult:
    """One group size: median step seconds and the weight bytes of each rank (rank 0 first)."""

    size: int
    prefill_s: float
    decode_s: float
    weight_bytes: list[int]


def run_tensor_parallel(model: str | None = None, batch: int = 4, prompt_len: int = 128,
                        decode_steps: int = 16, repeat: int = 3) -> list[TpResult]:
    """TP=1, then TP=2 (module docstring)."""
    return [_measure(model, size, batch, prompt_len, decode_steps, repeat) for size in (1, 2)]


def format_result(results: list[TpResult]) -> str:
    one, two = results
    mib = [[round(b / 2**20, 1) for b in r.weight_bytes] for r in results]
    return "\n".join([
        f"tensor parallel (TP=2 vs TP=1, {os.cpu_count()} CPU cores):",
        f"  prefill step  {two.prefill_s * 1e3:8.1f} ms vs {one.prefill_s * 1e3:8.1f} ms  "
        f"({two.prefill_s / one.prefill_s:.2f}x)",
        f"  decode step   {two.decode_s * 1e3:8.1f} ms vs {one.decode_s * 1e3:8.1f} ms  "
        f"({two.decode_s / one.decode_s:.2f}x)",
        f"  weight MiB per rank {mib[1]} vs {mib[0]}  (largest rank "
        f"{max(two.weight_bytes) / one.weight_bytes[0]:.2f}x, smallest "
        f"{min(two.weight_bytes) / one.weight_bytes[0]:.2f}x)",
    ])


def _measure(model: str | None, size: int, batch: int, prompt_len: int, decode_steps: int,
             repeat: int) -> TpResult:
    blocks_per_seq = -(-(prompt_len + decode_steps + 1) // BLOCK_SIZE)
    procs, ports, metrics_ports = _start_ranks(model, size, batch * blocks_per_seq)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{ports[0]}")
        stub = worker_pb2_grpc.WorkerStub(channel)
        _wait_ready(stub, procs)
        prefill, decode = _time_steps(stub, batch, prompt_len, decode_steps, repeat,
                                      blocks_per_seq)
        weights = [_weight_bytes(port) for port in metrics_ports]
        channel.close()
    finally:
        _stop(procs)
    return TpResult(size, prefill, decode, weights)


def _time_steps(stub: worker_pb2_grpc.WorkerStub, batch: int, prompt_len: int,
                decode_steps: int, repeat: int, blocks_per_seq: int) -> tuple[float, float]:
    """Median of ``repeat`` prefills of ``batch`` prompts, and of every decode step after each."""
    prefills: list[float] = []
    decodes: list[float] = []
    previous: list[int] = []
    step_id = 0
    for r in range(repeat):
        seq_ids = [r * batch + i + 1 for i in range(batch)]
        new_seqs = [NewSeq(s, [(s * 31 + j) % 1000 + 10 for j in range(prompt_len)], prompt_len,
                           GREEDY) for s in seq_ids]
        rows = [ScheduledRow(s, 0, prompt_len, sample=True, new_block_ids=list(
            range(i * blocks_per_seq, (i + 1) * blocks_per_seq))) for i, s in enumerate(seq_ids)]
        step_id += 1
        prefills.append(_step(stub, WorkerStep(step_id, new_seqs, ScheduledBatch.from_rows(rows),
                                               finished_seq_ids=previous)))
        for d in range(decode_steps):
            step_id += 1
            decodes.append(_step(stub, WorkerStep(step_id, scheduled=ScheduledBatch.from_rows(
                ScheduledRow(s, prompt_len + d, 1, sample=True) for s in seq_ids))))
        previous = seq_ids
    return statistics.median(prefills), statistics.median(decodes)


def _step(stub: worker_pb2_grpc.WorkerStub, step: WorkerStep) -> float:
    started = time.perf_counter()
    result = decode_result(stub.Step(encode_step(step), timeout=300))
    elapsed = time.perf_counter() - started
    if len(result) != len(step.scheduled):
        raise RuntimeError(f"step {step.step_id}: {len(result)} sampled")
    return elapsed


def _start_ranks(model: str | None, size: int, num_blocks: int
                 ) -> tuple[list[subprocess.Popen[bytes]], list[int], list[int]]:
    ports = [free_port() for _ in range(2 * size + 1)]
    master, grpc_ports, metrics_ports = ports[0], ports[1:size + 1], ports[size + 1:]
    logs = Path(tempfile.mkdtemp(prefix="bench-tp-"))
    procs = []
    for rank in range(size):
        args = [sys.executable, "-m", "worker", "--device", "cpu", "--dtype", "float32",
                "--num-gpu-blocks", str(num_blocks), "--swap-space-gib", "0.01",
                "--port", str(grpc_ports[rank]), "--metrics-port", str(metrics_ports[rank]),
                "--log-level", "WARNING"]
        if model:
            args += ["--model", model]
        if size > 1:
            args += ["--tensor-parallel-size", str(size), "--tensor-parallel-rank", str(rank),
                     "--tensor-parallel-master", f"127.0.0.1:{master}"]
        with open(logs / f"tp{size}-rank{rank}.log", "wb") as log:
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                          env=_rank_env(size)))
    return procs, grpc_ports, metrics_ports


def _rank_env(size: int) -> dict[str, str]:
    """Ranks sharing one CPU divide its cores (as ``torchrun`` does): a kernel thread spinning
    for work on a core another rank needs stalls every collective."""
    threads = max(1, (os.cpu_count() or 1) // size)
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def _wait_ready(stub: worker_pb2_grpc.WorkerStub, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a worker rank exited while starting (see its log)")
        try:
            stub.GetInfo(worker_pb2.WorkerInfoRequest(), timeout=1)
            return
        except grpc.RpcError:
            time.sleep(0.5)
    raise TimeoutError("the worker did not start within 10 minutes")


def _weight_bytes(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "pagedserve_worker_model_weight_bytes":
            return int(family.samples[0].value)
    raise RuntimeError("no pagedserve_worker_model_weight_bytes")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:  # the leader first: it shuts its followers down
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pagedserve bench tensor-parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the packaged SmolLM2")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    results = run_tensor_parallel(args.model, args.batch, args.prompt_len, args.decode_steps,
                                  args.repeat)
    print(format_result(results))
    return 0
