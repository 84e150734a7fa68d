"""``make soak`` / ``python -m pagedserve.loadtest.soak``: a bounded soak of a local cluster under
faults. It stops by itself and exits non-zero if anything leaked.

It starts ``redis-server`` and ``pagedserve up --kvstore redis://...`` (router, scheduler,
``--workers`` workers, each a process; ``up`` restarts what dies), then for ``--duration``
seconds sends Poisson arrivals (``--rate`` per second) of:

- **greedy** requests over a fixed set of prompts whose outputs were recorded before the load
  began: every one that completes must be token-exact with its reference (batching, preemption,
  failover and restarts must not change a greedy output);
- **cancelled** streams (the client hangs up after a few messages) and **deadline** requests
  (a client deadline of 50 ms to 1 s on a long generation);
- **hostile** requests: parameters that once took a worker down for everyone (beam search with
  a huge negative length penalty, float extremes), out-of-vocabulary prompt and stop ids, an
  empty prompt, a 2 MB prompt, out-of-range values. Each must end with a clear error (or OK).

Faults, at fixed points of the run: worker 0 is SIGKILLed at 30% (``up`` restarts it, the
scheduler re-admits it), and Redis is killed at 60% and started again 10 s later.

Afterwards it waits for the scheduler to drain, then prints: requests by kind and status,
greedy requests that did not complete and outputs that differed from their reference (both
must be 0: bystanders are unaffected), blocks in use after the drain (must be 0),
streams stuck (a call that outlived its deadline by ``STUCK_GRACE_S``; must be 0), restarts,
and the resident memory of each service when the load began and when it ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pagedserve.core.grpc_util import CHANNEL_OPTIONS
from pagedserve.loadtest.arrivals import arrival_offsets
from pagedserve.up import free_port
from protos.pagedserve.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

STUCK_GRACE_S = 30.0  # a call still open this long past its own deadline is stuck
GREEDY_TIMEOUT_S = 120.0
KIND_WEIGHTS = {"greedy": 0.6, "cancel": 0.12, "deadline": 0.12, "hostile": 0.16}
F32_MAX = 3.4e38


# ------------------------------------------------------------------------------ the cluster

class SoakCluster:
    """``redis-server`` plus ``pagedserve up`` as process trees of their own."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.port, self.sched_port, self.redis_port = free_port(), free_port(), free_port()
        self.log = workdir / "up.log"
        self.redis: subprocess.Popen[bytes] | None = None
        self.up: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 600.0) -> None:
        self.start_redis()
        cmd = [sys.executable, "-m", "pagedserve.cli", "up", "--workers", str(self.args.workers),
               "--port", str(self.port), "--http-port", "0", "--scheduler-port",
               str(self.sched_port), "--kvstore", f"redis://127.0.0.1:{self.redis_port}/0",
               "--kv-cache-memory-gib", str(self.args.kv_cache_memory_gib),
               "--log-level", "WARNING"]
        if self.args.model:
            cmd += ["--model", self.args.model]
        with open(self.log, "w") as out:
            self.up = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        deadline = time.monotonic() + timeout
        while "pagedserve is up" not in self.log.read_text():
            if self.up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not start; {self.log}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (`make services` installs it)")
        self.redis = subprocess.Popen(
            [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.redis_port), 0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def kill_redis(self) -> None:
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait()

    def pids(self) -> dict[str, int]:
        """The current pid of each service, from ``up``'s "started/restarted NAME (pid N" lines."""
        pids: dict[str, int] = {}
        for line in self.log.read_text().splitlines():
            for verb in ("up: started ", "up: restarted "):
                if line.startswith(verb) and " (pid " in line:
                    name, rest = line[len(verb):].split(" (pid ", 1)
                    pids[name] = int(rest.split(")")[0].split(",")[0])
        return pids

    def restarts(self) -> int:
        return sum(line.startswith("up: restarted ") for line in self.log.read_text().splitlines())

    def stop(self) -> None:
        if self.up is not None and self.up.poll() is None:
            os.killpg(self.up.pid, signal.SIGINT)
            try:
                self.up.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.up.pid, signal.SIGKILL)
                self.up.wait()
        self.kill_redis()


def rss_by_service(pids: dict[str, int]) -> dict[str, tuple[int, float | None]]:
    return {name: (pid, rss_mib(pid)) for name, pid in pids.items()}


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------- the requests

@dataclass
class Outcome:
    kind: str
    status: str
    tokens: list[int] = field(default_factory=list)
    prompt: int = -1  # greedy: which reference prompt
    stuck: bool = False


def hostile_requests(vocab_size: int) -> list[tuple[str, generation_pb2.GenerateRequest]]:
    """Requests that must fail (or succeed) alone, never taking a worker down."""
    def req(params: dict[str, Any], ids: list[int] | None = None, text: str | None = None
            ) -> generation_pb2.GenerateRequest:
        r = generation_pb2.GenerateRequest(params=common_pb2.SamplingParams(**params))
        if text is not None:
            r.text = text
        else:
            r.token_ids.ids.extend(ids if ids is not None else [5, 6, 7, 8])
        return r

    return [
        ("beam, length_penalty -2000", req({"beam_width": 2, "length_penalty": -2000,
                                            "max_tokens": 4, "temperature": 0.0})),
        ("temperature 3.4e38", req({"temperature": F32_MAX, "max_tokens": 4})),
        ("beam, length_penalty 3.4e38", req({"beam_width": 2, "length_penalty": F32_MAX,
                                             "max_tokens": 4, "temperature": 0.0})),
        ("best_of, temperature 3.4e38", req({"best_of": 3, "n": 1, "temperature": F32_MAX,
                                             "max_tokens": 4})),
        ("out-of-vocabulary prompt id", req({"max_tokens": 4}, ids=[5, vocab_size + 7])),
        ("negative prompt id", req({"max_tokens": 4}, ids=[5, -3])),
        ("out-of-vocabulary stop id", req({"max_tokens": 4, "stop_token_ids": [vocab_size]})),
        ("empty prompt", req({"max_tokens": 4}, ids=[])),
        ("2 MB prompt", req({"max_tokens": 4}, text="a " * (1 << 20))),
        ("top_p 0", req({"top_p": 0.0, "max_tokens": 4})),
        ("max_tokens -1", req({"max_tokens": -1})),
        ("n 1000", req({"n": 1000, "max_tokens": 4})),
        ("logprobs 10000", req({"logprobs": 10000, "max_tokens": 4})),
    ]


async def _call(stub: generation_pb2_grpc.GenerationStub, request: generation_pb2.GenerateRequest,
                timeout: float, hang_up_after: int | None = None) -> tuple[str, list[int]]:
    """One Generate stream: its final status name and output 0's tokens. ``hang_up_after``:
    the client cancels after that many messages."""
    call = stub.Generate(request, timeout=timeout)
    tokens: list[int] = []
    seen = 0
    try:
        async for msg in call:
            if msg.index == 0:
                tokens.extend(msg.token_ids)
            seen += 1
            if hang_up_after is not None and seen >= hang_up_after:
                call.cancel()
                return "CANCELLED_BY_CLIENT", tokens
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, tokens
    finally:
        call.cancel()
    return "OK", tokens


class Load:
    def __init__(self, stub: generation_pb2_grpc.GenerationStub, prompts: list[list[int]],
                 max_tokens: int, vocab_size: int, seed: int) -> None:
        self.stub, self.prompts, self.max_tokens = stub, prompts, max_tokens
        self.rng = random.Random(seed)
        self.hostile = hostile_requests(vocab_size)

    def greedy_request(self, i: int) -> generation_pb2.GenerateRequest:
        r = generation_pb2.GenerateRequest(params=common_pb2.SamplingParams(
            temperature=0.0, max_tokens=self.max_tokens, ignore_eos=True))
        r.token_ids.ids.extend(self.prompts[i])
        return r

    async def one(self, kind: str) -> Outcome:
        rng = self.rng
        if kind == "greedy":
            i = rng.randrange(len(self.prompts))
            return await self._bounded(Outcome(kind, "", prompt=i), self.greedy_request(i),
                                       GREEDY_TIMEOUT_S)
        if kind == "cancel":
            return await self._bounded(Outcome(kind, ""), self._long(), GREEDY_TIMEOUT_S,
                                       hang_up_after=rng.randint(1, 5))
        if kind == "deadline":
            return await self._bounded(Outcome(kind, ""), self._long(), rng.uniform(0.05, 1.0))
        name, request = rng.choice(self.hostile)
        return await self._bounded(Outcome(f"hostile: {name}", ""), request, 60.0)

    def _long(self) -> generation_pb2.GenerateRequest:
        r = generation_pb2.GenerateRequest(params=common_pb2.SamplingParams(
            temperature=0.8, seed=self.rng.randrange(1 << 30), max_tokens=4 * self.max_tokens,
            ignore_eos=True))
        r.token_ids.ids.extend(self.rng.choice(self.prompts))
        return r

    async def _bounded(self, out: Outcome, request: generation_pb2.GenerateRequest,
                       timeout: float, hang_up_after: int | None = None) -> Outcome:
        try:
            out.status, out.tokens = await asyncio.wait_for(
                _call(self.stub, request, timeout, hang_up_after), timeout + STUCK_GRACE_S)
        except TimeoutError:
            out.status, out.stuck = "STUCK", True
        return out


# ------------------------------------------------------------------------------------ run

async def soak(args: argparse.Namespace, cluster: SoakCluster) -> dict[str, Any]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{cluster.port}", options=CHANNEL_OPTIONS)
    sched = grpc.aio.insecure_channel(f"127.0.0.1:{cluster.sched_port}", options=CHANNEL_OPTIONS)
    stub = generation_pb2_grpc.GenerationStub(channel)
    sched_stub = scheduler_pb2_grpc.SchedulerStub(sched)
    try:
        info = await stub.GetModelInfo(generation_pb2.ModelInfoRequest(), timeout=30)
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(100, min(info.vocab_size, 30000))
                    for _ in range(rng.randint(8, args.max_prompt_len))]
                   for _ in range(args.num_prompts)]
        load = Load(stub, prompts, args.max_tokens, info.vocab_size, args.seed)
        references = []
        for i in range(len(prompts)):  # one at a time, before any load or fault
            status, tokens = await _call(stub, load.greedy_request(i), GREEDY_TIMEOUT_S)
            if status != "OK":
                raise RuntimeError(f"reference request {i} failed: {status}")
            references.append(tokens)
        rss_before = rss_by_service(cluster.pids())
        offsets = arrival_offsets(10 ** 6, args.rate, 1.0, args.seed)
        kinds = list(KIND_WEIGHTS)
        weights = list(KIND_WEIGHTS.values())
        faults = [(0.3 * args.duration, "kill worker 0"), (0.6 * args.duration, "kill redis"),
                  (0.6 * args.duration + 10.0, "restart redis")]
        tasks: list[asyncio.Task[Outcome]] = []
        start = time.monotonic()
        for offset in offsets:
            if offset >= args.duration:
                break
            while faults and faults[0][0] <= offset:
                await asyncio.sleep(max(0.0, start + faults[0][0] - time.monotonic()))
                _fault(cluster, faults.pop(0)[1])
            await asyncio.sleep(max(0.0, start + offset - time.monotonic()))
            tasks.append(asyncio.create_task(load.one(rng.choices(kinds, weights)[0])))
        for _, fault in faults:  # the run was too short to reach them in arrival order
            _fault(cluster, fault)
        outcomes = await asyncio.gather(*tasks)
        load_seconds = time.monotonic() - start
        rss_after = rss_by_service(cluster.pids())
        in_use = await _drained_blocks_in_use(sched_stub)
        return _report(args, outcomes, references, in_use, load_seconds, rss_before, rss_after,
                       cluster.restarts())
    finally:
        await channel.close()
        await sched.close()


def _fault(cluster: SoakCluster, fault: str) -> None:
    print(f"soak: {fault}", flush=True)
    if fault == "kill worker 0":
        os.kill(cluster.pids()["worker 0"], signal.SIGKILL)
    elif fault == "kill redis":
        cluster.kill_redis()
    else:
        cluster.start_redis()


async def _drained_blocks_in_use(stub: scheduler_pb2_grpc.SchedulerStub,
                                 timeout: float = 120.0) -> int:
    """Blocks still held once nothing runs, waits or is swapped (cached free blocks are free)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await stub.GetStats(scheduler_pb2.StatsRequest(), timeout=10)
        busy = stats.num_running + stats.num_waiting + stats.num_swapped
        if busy == 0 or time.monotonic() > deadline:
            return sum(w.num_blocks - w.num_free_blocks for w in stats.workers if w.healthy) + (
                0 if busy == 0 else 10 ** 9)
        await asyncio.sleep(0.5)


def _report(args: argparse.Namespace, outcomes: list[Outcome], references: list[list[int]],
            in_use: int, load_seconds: float, rss_before: dict[str, tuple[int, float | None]],
            rss_after: dict[str, tuple[int, float | None]], restarts: int) -> dict[str, Any]:
    by_kind: dict[str, Counter[str]] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, Counter())[o.status] += 1
    mismatched = sum(o.kind == "greedy" and o.status == "OK" and o.tokens != references[o.prompt]
                     for o in outcomes)
    return {
        "duration_s": args.duration, "load_seconds": round(load_seconds, 1), "rate": args.rate,
        "workers": args.workers, "requests": len(outcomes),
        "completed_ok": sum(o.status == "OK" for o in outcomes),
        "statuses": {kind: dict(c) for kind, c in sorted(by_kind.items())},
        "greedy_mismatches": mismatched,
        "blocks_in_use_after_drain": in_use,
        "streams_stuck": sum(o.stuck for o in outcomes),
        "restarts": restarts,
        "greedy_failed": sum(o.kind == "greedy" and o.status != "OK" for o in outcomes),
        # per service: RSS when the load began and when it ended, and whether that is the same
        # process (a restarted one starts over: its growth says nothing)
        "rss_mib": {name: {"start": rss_before[name][1], "end": rss_after[name][1],
                           "same_process": rss_before[name][0] == rss_after[name][0]}
                    for name in sorted(set(rss_before) & set(rss_after))},
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [f"pagedserve soak: {r['requests']} requests in {r['load_seconds']} s "
             f"(Poisson {r['rate']}/s, {r['workers']} workers; worker 0 SIGKILLed at 30%, Redis "
             "killed at 60% and restarted 10 s later)",
             f"  completed OK: {r['completed_ok']}"]
    for kind, statuses in r["statuses"].items():
        lines.append(f"  {kind:<34} " + ", ".join(f"{s} {n}" for s, n in sorted(statuses.items())))
    lines += [f"  greedy requests that did not complete: {r['greedy_failed']}",
              f"  greedy outputs differing from their reference: {r['greedy_mismatches']}",
              f"  blocks in use after drain: {r['blocks_in_use_after_drain']}",
              f"  streams stuck: {r['streams_stuck']}",
              f"  service restarts: {r['restarts']}"]
    for name, rss in r["rss_mib"].items():
        start, end = rss["start"], rss["end"]
        growth = (f"{end - start:+.0f} MiB" if start is not None and end is not None else "n/a"
                  ) if rss["same_process"] else "restarted in between"
        lines.append(f"  RSS {name:<10} {_mib(start)} -> {_mib(end)} ({growth})")
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MiB"


def healthy(r: dict[str, Any]) -> bool:
    return (r["blocks_in_use_after_drain"] == 0 and r["streams_stuck"] == 0
            and r["greedy_mismatches"] == 0 and r["greedy_failed"] == 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pagedserve.loadtest.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--rate", type=float, default=2.0, help="requests per second (Poisson)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", default=None, help="default: the packaged SmolLM2")
    p.add_argument("--kv-cache-memory-gib", type=float, default=0.5)
    p.add_argument("--num-prompts", type=int, default=8, help="greedy reference prompts")
    p.add_argument("--max-prompt-len", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=24, help="greedy requests' length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the report as JSON")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pagedserve-soak-"))
    cluster = SoakCluster(args, workdir)
    try:
        cluster.start()
        print(f"soak: cluster up (log {cluster.log}); {args.duration:.0f} s of load", flush=True)
        report = asyncio.run(soak(args, cluster))
    finally:
        cluster.stop()
    print(format_report(report))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    return 0 if healthy(report) else 1


if __name__ == "__main__":
    sys.exit(main())
