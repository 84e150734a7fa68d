"""``pagedserve bench throughput``: one workload, three ways, in one invocation.

1. **offline** — ``pagedserve.LLM.generate`` (scheduler + worker in this process);
2. **cluster** — router, scheduler and worker as the processes ``pagedserve up`` starts (as
   deployed), every request submitted at once from this process through ``AsyncClient`` as token
   ids;
   **cluster-inproc** (on request) — the same servers inside this process
   (``start_local_cluster``), sharing the offline run's loaded worker. Not a deployment anyone
   runs: router, scheduler, worker and the 64-stream client share one GIL, so each step waits on
   the others' Python (about 10% slower than **cluster** on 2 cores);
3. **hf** — Hugging Face ``generate`` with static batching: batches of ``hf_batch_size`` in
   request order, left padding, greedy, ``min_new_tokens = max_new_tokens`` = the batch's longest
   output (so EOS is ignored and the batch runs to its longest member, as static batching does).
   Only the tokens each request asked for count as useful output.

Offline and cluster load the same weights file; each engine starts with an empty prefix cache.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pagedserve.bench.workload import Request, WorkloadSpec, make_requests
from pagedserve.core.models import resolve_model_path
from pagedserve.core.sampling import make_sampling_params
from protos.pagedserve.v1 import common_pb2

if TYPE_CHECKING:
    import psutil

    from pagedserve.client import AsyncClient
    from pagedserve.llm import LLM
    from worker.worker import Worker


@dataclass
class RunResult:
    name: str
    seconds: float
    num_requests: int
    num_output_tokens: int  # useful tokens: what the requests asked for
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.seconds


def _params(request: Request) -> common_pb2.SamplingParams:
    return make_sampling_params(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)


def _check_lengths(name: str, requests: Sequence[Request], outputs: Sequence[int]) -> int:
    for i, (req, got) in enumerate(zip(requests, outputs, strict=True)):
        if got != req.max_tokens:
            raise RuntimeError(f"{name}: request {i} produced {got} tokens, asked {req.max_tokens}")
    return sum(outputs)


# ------------------------------------------------------------------------------------ offline

def run_offline(llm: LLM, requests: Sequence[Request]) -> tuple[RunResult, list[list[int]]]:
    """``llm`` is a ``pagedserve.LLM``; returns the result and every request's output ids."""
    llm.generate([[1, 2, 3]], make_sampling_params(max_tokens=2, temperature=0.0))  # warm up
    worker = llm.worker
    forward0, sample0 = worker.forward_seconds, worker.sample_seconds
    cpu0 = time.process_time()
    start = time.perf_counter()
    outs = llm.generate([r.prompt_token_ids for r in requests], [_params(r) for r in requests])
    seconds = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    count = _check_lengths("offline", requests, [len(t) for t in tokens])
    note = (f"forward {worker.forward_seconds - forward0:.2f} s, sampling "
            f"{worker.sample_seconds - sample0:.2f} s, CPU s {time.process_time() - cpu0:.1f}")
    return RunResult("offline", seconds, len(requests), count, note), tokens


# ------------------------------------------------------------------------------------ cluster

def run_cluster(model: str | None, requests: Sequence[Request], kv_cache_memory_gib: float,
                startup_timeout: float = 600.0) -> tuple[RunResult, list[list[int]]]:
    """Starts ``pagedserve up`` (one worker), drives it from this process, stops it."""
    from pagedserve.up import free_port

    port = free_port()
    argv = [sys.executable, "-m", "pagedserve.cli", "up", "--port",
            str(port), "--no-restart", "--kv-cache-memory-gib", str(kv_cache_memory_gib),
            "--log-level", "WARNING", *(["--model", model] if model else [])]
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          start_new_session=True)
    try:
        _wait_for_up(up, startup_timeout)
        services = _service_processes(up.pid)
        cpu0 = _cpu_seconds(services)
        seconds, tokens = asyncio.run(_drive(f"127.0.0.1:{port}", requests))
        cpu = {name: t - cpu0[name] for name, t in _cpu_seconds(services).items()}
    finally:
        up.send_signal(signal.SIGINT)  # up stops its children and exits
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    count = _check_lengths("cluster", requests, [len(t) for t in tokens])
    note = "CPU s " + ", ".join(f"{name} {t:.1f}" for name, t in cpu.items())
    return RunResult("cluster", seconds, len(requests), count, note), tokens


def _service_processes(up_pid: int) -> dict[str, psutil.Process]:
    """``up``'s children by service (``worker``, ``scheduler``, ``router``; ``python -m
    <service>``), and this process as ``client``: where a cluster run's CPU time goes."""
    import psutil

    found = {"client": psutil.Process()}
    for child in psutil.Process(up_pid).children(recursive=True):
        cmdline = child.cmdline()
        if "-m" in cmdline and cmdline.index("-m") + 1 < len(cmdline):
            found[cmdline[cmdline.index("-m") + 1]] = child
    return found


def _cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """User + system CPU seconds of each process so far (all its threads)."""
    times = {name: p.cpu_times() for name, p in processes.items()}
    return {name: t.user + t.system for name, t in times.items()}


def _wait_for_up(up: subprocess.Popen[str], timeout: float) -> None:
    assert up.stdout is not None
    deadline = time.monotonic() + timeout
    for line in up.stdout:  # up prints one line per stage; its last says where the router is
        if "pagedserve is up" in line:
            return
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"pagedserve up did not come up (exit code {up.poll()})")


def run_cluster_inproc(worker: Worker, requests: Sequence[Request],
                       enable_prefix_caching: bool = True) -> tuple[RunResult, list[list[int]]]:
    """Serves ``worker`` (a loaded ``worker.worker.Worker``) behind real gRPC servers."""
    return asyncio.run(_cluster_inproc(worker, requests, enable_prefix_caching))


async def _cluster_inproc(worker: Worker, requests: Sequence[Request],
                          enable_prefix_caching: bool) -> tuple[RunResult, list[list[int]]]:
    from pagedserve.cluster import start_local_cluster
    from scheduler.config import BatchingConfig, CacheConfig, SchedulerConfig

    sconf = SchedulerConfig(batching=BatchingConfig(max_waiting_requests=1 << 20),
                            cache=CacheConfig(enable_prefix_caching=enable_prefix_caching))
    cluster = await start_local_cluster([worker.config], sconf, workers=[worker])
    try:
        seconds, tokens = await _drive(cluster.router_address, requests)
    finally:
        await cluster.stop()
    count = _check_lengths("cluster-inproc", requests, [len(t) for t in tokens])
    return RunResult("cluster-inproc", seconds, len(requests), count), tokens


async def _drive(address: str, requests: Sequence[Request]) -> tuple[float, list[list[int]]]:
    """Every request at once; seconds from the first submit to the last token."""
    from pagedserve.client import AsyncClient

    async with AsyncClient(address) as client:
        await _one(client, Request([1, 2, 3], 2))  # warm up channels
        start = time.perf_counter()
        tokens = await asyncio.gather(*(_one(client, r) for r in requests))
        return time.perf_counter() - start, list(tokens)


async def _one(client: AsyncClient, request: Request) -> list[int]:
    ids: list[int] = []
    async for response in client.generate(token_ids=request.prompt_token_ids,
                                          max_tokens=request.max_tokens, temperature=0.0,
                                          ignore_eos=True, timeout=1800):
        ids.extend(response.token_ids)
    return ids


# ----------------------------------------------------------------------------------------- HF

def load_hf(model: str | None) -> torch.nn.Module:
    import transformers

    path = resolve_model_path(model)
    if path.suffix == ".gguf":
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return hf.eval()


def run_hf(hf: torch.nn.Module, requests: Sequence[Request],
           batch_size: int = 16) -> tuple[RunResult, list[list[int]]]:
    _hf_batch(hf, [Request([1, 2, 3], 2)])  # warm up
    start = time.perf_counter()
    tokens: list[list[int]] = []
    for first in range(0, len(requests), batch_size):
        tokens.extend(_hf_batch(hf, requests[first : first + batch_size]))
    seconds = time.perf_counter() - start
    count = sum(r.max_tokens for r in requests)
    return RunResult("hf", seconds, len(requests), count, f"static batches of {batch_size}"), tokens


def _hf_batch(hf: torch.nn.Module, batch: Sequence[Request]) -> list[list[int]]:
    """Left-padded greedy ``generate``; each row's first ``max_tokens`` new ids."""
    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, r in enumerate(batch):
        ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
        mask[row, width - len(r.prompt_token_ids):] = 1
    longest = max(r.max_tokens for r in batch)
    with torch.inference_mode():
        # ``generate`` comes from transformers' GenerationMixin, which nn.Module does not declare.
        out = hf.generate(  # type: ignore[operator]
            ids, attention_mask=mask, do_sample=False, max_new_tokens=longest,
            min_new_tokens=longest, pad_token_id=0)
    return [out[row, width : width + r.max_tokens].tolist() for row, r in enumerate(batch)]


# -------------------------------------------------------------------------------------- driver

@dataclass
class ThroughputReport:
    spec: WorkloadSpec
    results: dict[str, RunResult]
    agreement: dict[str, float]  # fraction of requests whose outputs equal offline's
    repeat: int = 1  # runs per system; results are each system's fastest

    def ratio(self, name: str, base: str) -> float | None:
        if name not in self.results or base not in self.results:
            return None
        return self.results[name].tokens_per_s / self.results[base].tokens_per_s


def run_throughput(spec: WorkloadSpec, model: str | None = None, *, systems: Sequence[str] = (
        "offline", "cluster", "hf"), hf_batch_size: int = 16,
        kv_cache_memory_gib: float = 2.0, repeat: int = 1) -> ThroughputReport:
    """Each system runs ``repeat`` times and keeps its fastest run (on a shared machine the
    slow runs are other tenants' noise, for the baseline and for us alike). Offline and cluster
    runs alternate, each on a freshly loaded engine with an empty prefix cache."""
    from pagedserve import LLM

    results: dict[str, RunResult] = {}
    outputs: dict[str, list[list[int]]] = {}

    def keep(result: RunResult, tokens: list[list[int]]) -> None:
        best = results.get(result.name)
        if best is None or result.seconds < best.seconds:
            results[result.name] = result
        outputs.setdefault(result.name, tokens)

    worker_model = None
    engine_runs = repeat if {"offline", "cluster", "cluster-inproc"} & set(systems) else 1
    for _ in range(engine_runs):  # offline and cluster alternate: both see the same slow spells
        llm = LLM(model, seed=0, kv_cache_memory_gib=kv_cache_memory_gib, swap_space_gib=0.0)
        requests = make_requests(spec, llm.worker.model_config.vocab_size)
        worker_model = llm.worker.model_path
        if "offline" in systems:
            keep(*run_offline(llm, requests))
        llm.close()
        if "cluster-inproc" in systems:
            keep(*run_cluster_inproc(llm.worker, requests))
        del llm
        gc.collect()  # a closed LLM's KV pool is freed by the cyclic collector
        if "cluster" in systems:
            keep(*run_cluster(model, requests, kv_cache_memory_gib))
    assert worker_model is not None
    if "hf" in systems:
        hf = load_hf(str(worker_model))
        for _ in range(repeat):
            keep(*run_hf(hf, requests, hf_batch_size))
        del hf
    agreement = {}
    if "offline" in outputs:
        for name, outs in outputs.items():
            if name != "offline":
                same = sum(a == b for a, b in zip(outs, outputs["offline"], strict=True))
                agreement[name] = same / len(requests)
    return ThroughputReport(spec, results, agreement, repeat)


def format_report(report: ThroughputReport) -> str:
    best = f" (fastest of {report.repeat} runs each)" if report.repeat > 1 else ""
    lines = [f"workload: {report.spec.describe()}{best}",
             (f"{'system':<14} {'seconds':>9} {'out tok/s':>10} {'req/s':>8} {'vs hf':>7} "
             f"{'vs offline':>10}  note")]
    for name, r in report.results.items():
        vs_hf, vs_off = report.ratio(name, "hf"), report.ratio(name, "offline")
        lines.append(f"{name:<14} {r.seconds:>9.2f} {r.tokens_per_s:>10.1f} "
                     f"{r.requests_per_s:>8.3f} {_x(vs_hf):>7} {_x(vs_off):>10}  {r.note}")
    for name, frac in report.agreement.items():
        lines.append(f"greedy outputs identical to offline: {name} {frac:.0%} of requests")
    return "\n".join(lines)


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"
