"""``pagedserve up``: router + scheduler + N workers as separate processes on this machine.

Starts workers, then the scheduler, then the router (gRPC on ``--port``, the OpenAI-compatible
HTTP API on ``--http-port``), each once the previous ones answer ``grpc.health.v1`` SERVING;
serves until Ctrl-C/SIGTERM; then stops the router first and the workers last, each with SIGTERM
(graceful) and SIGKILL after a grace period.

Supervision: a process that dies is started again, with the same arguments and ports, after a
backoff (``RESTART_BASE_S`` doubling per quick failure up to ``RESTART_MAX_S``; a process that
stayed up ``STABLE_S`` starts again from the base), and ``up`` says so, and says when it serves
again. The others keep running: the scheduler moves a dead worker's requests to the others as
continuations and re-admits the worker when it answers again; the router's requests on a dead
scheduler end UNAVAILABLE and it reconnects to the restarted one. ``--no-restart`` restores
stop-everything-on-the-first-death (for scripts that want to notice).

Tensor parallelism: with ``--tensor-parallel-size N`` each of the ``--workers`` workers is a
group of N processes (``worker-0-rank0`` ... ``worker-0-rank{N-1}``: the same ``--worker-id``, a
rendezvous port of their own, rank 0 hosting it). Only the leaders (rank 0) serve the Worker
service and are given to the scheduler; a group is up once every rank answers SERVING (the
followers serve health only). A group is supervised as a unit: a rank that exits stops the
others of its group (SIGTERM; a group missing a rank cannot step) and all its ranks start again
together with the same commands after the backoff; the restarted leader is a new worker
instance, which the scheduler re-admits.

While it starts, it says on stderr which process it started, what it is waiting for (again every
``PROGRESS_EVERY_S`` seconds, with the time since that process started: a first start on CPU
spends about a minute building the C++ kernels, and until the router serves, clients get
"Connection refused"), and when each one is ready.

With ``--tls`` it first makes a throwaway CA and one certificate per service
(``pagedserve.certs.write_local_pki``) in a temporary directory, removed when it stops: every
connection is then mutual TLS, the workers admit only the scheduler's certificate and the
scheduler only the router's, and it prints the client flags that reach the router.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.core.grpc_util import TlsConfig, sync_channel
from pagedserve.core.logs import add_logging_arguments, configure_logging

logger = logging.getLogger(__name__)


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF directory or .gguf file (default: packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--workers", type=int, default=1,
                        help="number of workers (each a process, or a group of "
                             "--tensor-parallel-size processes)")
    parser.add_argument("--tensor-parallel-size", type=_positive_int, default=1,
                        help="ranks per worker: each worker is a tensor-parallel group of this "
                             "many processes that the scheduler sees as one worker")
    parser.add_argument("--host", default="127.0.0.1", help="router bind address")
    parser.add_argument("--port", type=int, default=50051, help="router port (gRPC)")
    parser.add_argument("--http-port", type=int, default=8000,
                        help="router's OpenAI-compatible HTTP API port (0 = a free port)")
    parser.add_argument("--scheduler-port", type=int, default=0, help="0 = a free port")
    parser.add_argument("--kv-cache-memory-gib", type=float, default=2.0)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kvstore", default="memory://")
    parser.add_argument("--preemption-mode", default="swap", choices=["swap", "recompute"])
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--metrics", action="store_true",
                        help="serve Prometheus metrics (ports printed at start)")
    parser.add_argument("--startup-timeout", type=float, default=300.0,
                        help="seconds each process may take, from its start, to serve")
    parser.add_argument("--no-restart", action="store_true",
                        help="stop the whole cluster when any process dies, instead of "
                             "restarting that process")
    parser.add_argument("--tls", action="store_true",
                        help="mutual TLS everywhere, with a throwaway CA and certificates "
                             "(their paths are printed at start)")
    parser.add_argument("--api-key-file", default=None,
                        help="the router's API keys (one 'ID:KEY' a line): clients must send "
                             "one (pagedserve generate --api-key KEY)")
    parser.add_argument("--prefix-cache-isolation", choices=("none", "api-key"), default=None,
                        help="the router's: api-key = requests share prefix-cache blocks only "
                             "with requests of the same API key (default none: everyone's)")
    add_logging_arguments(parser)  # --log-level, --log-format: up's and its children's


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: use 1 or more")
    return value


def tls_flags(tls: TlsConfig) -> list[str]:
    """The ``--tls-*`` flags that give a service (or a client) ``tls``."""
    flags = []
    for flag, path in (("--tls-cert-file", tls.cert_file), ("--tls-key-file", tls.key_file),
                       ("--tls-ca-file", tls.ca_file)):
        if path is not None:
            flags += [flag, path]
    return flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROGRESS_EVERY_S = 5.0
POLL_S = 0.2
RESTART_BASE_S = 1.0  # first restart delay; doubles per failure that came quickly
RESTART_MAX_S = 30.0
STABLE_S = 60.0  # up this long before dying: the next restart waits RESTART_BASE_S again


def restart_delay(quick_failures: int) -> float:
    """Backoff before restarting a process that died ``quick_failures`` times in a row without
    staying up ``STABLE_S`` (1 for the first death)."""
    return min(RESTART_MAX_S, RESTART_BASE_S * 2 ** max(quick_failures - 1, 0))


class _Process(Protocol):  # what waiting needs of a child: subprocess.Popen, or a test's fake
    returncode: int | None

    def poll(self) -> int | None: ...


@dataclass(frozen=True)
class Child:
    """A started child process as ``up`` reports it: ``name`` ("worker 0", "scheduler",
    "router"), the address it will serve on, what it does before it serves, and when (the
    ``time.monotonic()`` value) it was started."""

    name: str
    address: str
    doing: str
    started: float


def say(message: str, out: TextIO | None = None) -> None:
    """One progress line on stderr (plain print: ``up`` configures logging for the children)."""
    print(f"up: {message}", file=out or sys.stderr, flush=True)


def wait_until_serving(
    child: Child, proc: _Process, timeout: float, is_serving: Callable[[], bool], *,
    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
    every_s: float = PROGRESS_EVERY_S, out: TextIO | None = None,
) -> float:
    """Polls ``is_serving`` until it is true; returns the seconds since the child started.

    Says "waiting for ..." when the first check fails, again every ``every_s`` seconds with the
    time so far, and "... ready" at the end. Raises ``RuntimeError`` if the process exits and
    ``TimeoutError`` once it has not served ``timeout`` seconds after it started."""
    next_report: float | None = None  # None: not announced yet
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with code {proc.returncode} before serving")
        if is_serving():
            elapsed = clock() - child.started
            say(f"{child.name} ready on {child.address} after {elapsed:.1f}s", out)
            return elapsed
        now = clock()
        elapsed = now - child.started
        if elapsed >= timeout:
            raise TimeoutError(f"{child.name} not serving on {child.address} after "
                               f"{timeout:.0f}s (--startup-timeout)")
        if next_report is None or now >= next_report:
            so_far = f" {elapsed:.0f}s" if next_report is not None else ""
            say(f"waiting for {child.name} on {child.address} ({child.doing}) ...{so_far}", out)
            next_report = now + every_s
        sleep(POLL_S)


def health_check(channel: grpc.Channel, timeout: float = 1.0) -> Callable[[], bool]:
    """One ``grpc.health.v1`` check per call: True once the server answers SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)

    def is_serving() -> bool:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:  # not listening yet ("Connection refused"), or not answering
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return is_serving


def wait_serving(child: Child, proc: _Process, timeout: float,
                 tls: TlsConfig | None = None) -> float:
    with sync_channel(child.address, tls) as channel:
        return wait_until_serving(child, proc, timeout, health_check(channel))


@dataclass
class Member:
    """One child process of a supervised service: how to start it again, and the process."""

    name: str
    cmd: list[str]
    address: str
    proc: subprocess.Popen[bytes]


@dataclass
class Service:
    """A supervised unit and what became of it: one process, or the ranks of a tensor-parallel
    worker group (``members[0]`` the leader), which die and start again together: a group whose
    rank died cannot go on, so its other ranks are stopped and all of them restarted."""

    name: str
    members: list[Member]
    started: float  # time.monotonic() of its latest start
    restarts: int = 0
    quick_failures: int = 0  # deaths in a row, each before STABLE_S of uptime
    restart_at: float | None = None  # dead: when it starts again
    serving: bool = True  # False from a restart until every member answers SERVING again

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The leader's process (the only one, outside a group)."""
        return self.members[0].proc

    @property
    def address(self) -> str:
        """Where the scheduler (or the router) reaches it: the leader's address."""
        return self.members[0].address

    def exited(self) -> list[Member]:
        """The members that have exited, one killed by a signal first: when a rank dies the
        others exit 1 soon after (their group failed), often before anyone looks, and the
        signal names the cause."""
        gone = [m for m in self.members if m.proc.poll() is not None]
        return sorted(gone, key=lambda m: m.proc.returncode >= 0)


class Supervisor:
    def __init__(self, args: argparse.Namespace,
                 popen: Callable[[list[str]], subprocess.Popen[bytes]] = subprocess.Popen,
                 ) -> None:
        self.args = args
        self.services: list[Service] = []
        self.popen = popen  # how a child starts (tests give fakes)
        self._taken = {p for p in (getattr(args, name, 0) for name in
                                   ("port", "http_port", "scheduler_port")) if p}
        self.tls_dir: Path | None = None
        self.tls: dict[str, TlsConfig] = {}
        if args.tls:
            from pagedserve.certs import write_local_pki  # cryptography only when asked for

            self.tls_dir = Path(tempfile.mkdtemp(prefix="pagedserve-tls-"))
            self.tls = write_local_pki(self.tls_dir)
            say(f"TLS: throwaway CA and certificates in {self.tls_dir} (removed at exit)")

    def _tls_flags(self, role: str) -> list[str]:
        return tls_flags(self.tls[role]) if role in self.tls else []

    def _wait(self, child: Child, proc: _Process) -> None:
        wait_serving(child, proc, self.args.startup_timeout, self.tls.get("client"))

    def free_port(self) -> int:
        """A free port for a child, never one given on the command line (``--port``,
        ``--http-port``, ``--scheduler-port``) nor one handed out before: a port the OS calls
        free now may be the one the router is told to bind later."""
        while (port := free_port()) in self._taken:
            pass
        self._taken.add(port)
        return port

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        return [m.proc for svc in self.services for m in svc.members]

    def spawn(self, module: str, argv: list[str], name: str, address: str,
              doing: str) -> tuple[Child, subprocess.Popen[bytes]]:
        """Starts one supervised process."""
        ((child, proc),) = self.spawn_group(module, name, [(name, argv, address)], doing)
        return child, proc

    def spawn_group(self, module: str, name: str, ranks: list[tuple[str, list[str], str]],
                    doing: str) -> list[tuple[Child, subprocess.Popen[bytes]]]:
        """Starts the processes ``ranks`` (name, argv, address; the leader first) as one
        supervised service ``name``: if one dies, all of them start again."""
        members = []
        for rank_name, argv, address in ranks:
            cmd = [sys.executable, "-m", module, *argv, "--log-level", self.args.log_level,
                   "--log-format", self.args.log_format]
            members.append(Member(rank_name, cmd, address, self.popen(cmd)))
            say(f"started {rank_name} (pid {members[-1].proc.pid}), to serve on {address}")
        started = time.monotonic()
        self.services.append(Service(name, members, started))
        return [(Child(m.name, m.address, doing, started), m.proc) for m in members]

    def start(self) -> tuple[str, str]:
        """Starts every process in order, each once the ones it needs serve; the router's gRPC
        address and its HTTP API's URL."""
        a = self.args
        metrics: dict[str, int] = {}
        groups = self._start_workers(metrics)
        for name, group in groups:  # they load in parallel; wait for each rank in turn
            for child, proc in group:
                self._wait(child, proc)
            if len(group) > 1:
                say(f"{name} ready: all {len(group)} ranks serve, leader on "
                    f"{group[0][0].address}")
        leaders = [group[0][0].address for _, group in groups]  # the scheduler's workers
        scheduler, proc = self._start_scheduler(leaders, metrics)
        self._wait(scheduler, proc)
        http_port = a.http_port or self.free_port()
        router, proc = self._start_router(scheduler.address, http_port, metrics)
        self._wait(router, proc)  # SERVING: the HTTP port is bound too
        for name, port in metrics.items():
            print(f"metrics: {name} http://127.0.0.1:{port}/metrics", flush=True)
        scheme = "https" if self.tls else "http"
        return router.address, f"{scheme}://{router.address.rsplit(':', 1)[0]}:{http_port}"

    def _start_workers(self, metrics: dict[str, int]
                       ) -> list[tuple[str, list[tuple[Child, subprocess.Popen[bytes]]]]]:
        """One supervised service per worker: a process, or with ``--tensor-parallel-size N``
        a group of N rank processes (leader first) that the scheduler sees as one worker."""
        return [(f"worker {i}", self.spawn_group("worker", f"worker {i}", self._worker_ranks(
                    i, metrics), "loading the model / building CPU kernels"))
                for i in range(self.args.workers)]

    def _worker_ranks(self, index: int, metrics: dict[str, int]
                      ) -> list[tuple[str, list[str], str]]:
        """Name, argv and address of each rank of worker ``index``; a group's ranks share the
        worker id and a rendezvous port (rank 0 hosts it) and each has its own ports."""
        a = self.args
        size = a.tensor_parallel_size
        worker_id = f"worker-{index}"
        shared = ["--worker-id", worker_id, "--kv-cache-memory-gib", str(a.kv_cache_memory_gib),
                  "--block-size", str(a.block_size),
                  "--max-num-batched-tokens", str(a.max_num_batched_tokens),
                  *self._tls_flags("worker")]
        if size > 1:
            shared += ["--tensor-parallel-size", str(size),
                       "--tensor-parallel-master", f"127.0.0.1:{self.free_port()}"]
        ranks = []
        for rank in range(size):
            name = f"worker {index}" if size == 1 else f"{worker_id}-rank{rank}"
            port = self.free_port()
            argv = [*self._model_args(), "--port", str(port), *shared]
            if size > 1:
                argv += ["--tensor-parallel-rank", str(rank)]
            if a.metrics:
                key = worker_id if size == 1 else name
                metrics[key] = self.free_port()
                argv += ["--metrics-port", str(metrics[key])]
            ranks.append((name, argv, f"127.0.0.1:{port}"))
        return ranks

    def _start_scheduler(self, worker_addrs: list[str], metrics: dict[str, int]
                         ) -> tuple[Child, subprocess.Popen[bytes]]:
        a = self.args
        sched_port = a.scheduler_port or self.free_port()
        argv = ["--port", str(sched_port), "--kvstore", a.kvstore,
                "--preemption-mode", a.preemption_mode,
                "--max-num-batched-tokens", str(a.max_num_batched_tokens),
                *self._tls_flags("scheduler")]
        for addr in worker_addrs:
            argv += ["--worker", addr]
        if a.metrics:
            metrics["scheduler"] = self.free_port()
            argv += ["--metrics-port", str(metrics["scheduler"])]
        return self.spawn("scheduler", argv, "scheduler", f"127.0.0.1:{sched_port}",
                          "connecting to the workers")

    def _start_router(self, sched_address: str, http_port: int, metrics: dict[str, int]
                      ) -> tuple[Child, subprocess.Popen[bytes]]:
        a = self.args
        argv = [*self._model_args(), "--host", a.host, "--port", str(a.port),
                "--http-port", str(http_port), "--scheduler-address", sched_address,
                *self._tls_flags("router")]
        if a.api_key_file:
            argv += ["--api-key-file", a.api_key_file]
        if a.prefix_cache_isolation:
            argv += ["--prefix-cache-isolation", a.prefix_cache_isolation]
        if a.metrics:
            metrics["router"] = self.free_port()
            argv += ["--metrics-port", str(metrics["router"])]
        address = f"{'127.0.0.1' if a.host in ('0.0.0.0', '') else a.host}:{a.port}"
        return self.spawn("router", argv, "router", address, "loading the tokenizer")

    def _model_args(self) -> list[str]:
        return ["--model", self.args.model] if self.args.model else []

    def wait(self) -> int:
        """Supervises until SIGINT/SIGTERM (0), or until a process dies under ``--no-restart``
        (1)."""
        stop = {"signal": False}

        def on_signal(signum: int, frame: object) -> None:
            stop["signal"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop["signal"]:
            if not self.supervise(time.monotonic()):
                return 1
            time.sleep(POLL_S)
        return 0

    def supervise(self, now: float) -> bool:
        """One round over the children: notices deaths, starts again those whose backoff is
        over, and says when a restarted one serves again. False when a child died and
        ``--no-restart`` is set."""
        for svc in self.services:
            if svc.restart_at is not None:
                if now >= svc.restart_at:
                    self._restart(svc, now)
            elif dead := svc.exited():
                if self.args.no_restart:
                    logger.error("%s exited with code %s; stopping the cluster (--no-restart)",
                                 dead[0].name, dead[0].proc.returncode)
                    return False
                self._schedule_restart(svc, dead, now)
            elif not svc.serving and all(self.is_serving(m.address) for m in svc.members):
                svc.serving = True
                ranks = f" (all {len(svc.members)} ranks)" if len(svc.members) > 1 else ""
                say(f"{svc.name} serving again on {svc.address}{ranks} after "
                    f"{time.monotonic() - svc.started:.1f}s")
        return True

    def _schedule_restart(self, svc: Service, dead: list[Member], now: float) -> None:
        """``dead`` exited: ``svc`` starts again after the backoff. A group's other ranks are
        asked to stop now (SIGTERM; they would fail at their next collective anyway)."""
        up_for = now - svc.started
        svc.quick_failures = 1 if up_for >= STABLE_S else svc.quick_failures + 1
        delay = restart_delay(svc.quick_failures)
        svc.restart_at = now + delay
        what = ", ".join(f"{m.name} (pid {m.proc.pid}) exited with code {m.proc.returncode}"
                         for m in dead) + f" after {up_for:.0f}s"
        if len(svc.members) == 1:
            say(f"{what}; restarting it in {delay:.0f}s")
            return
        others = [m for m in svc.members if m not in dead and m.proc.poll() is None]
        for m in others:
            m.proc.terminate()
        stopping = ", ".join(f"{m.name} pid {m.proc.pid}" for m in others) or "none left"
        say(f"{what}; stopping the rest of {svc.name} ({stopping}) and restarting its "
            f"{len(svc.members)} ranks in {delay:.0f}s")

    def _restart(self, svc: Service, now: float) -> None:
        for m in svc.members:  # a rank that ignored SIGTERM must not hold its ports
            if m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait()
        for m in svc.members:
            m.proc = self.popen(m.cmd)
        svc.started, svc.restart_at, svc.serving = now, None, False
        svc.restarts += 1
        if len(svc.members) == 1:
            say(f"restarted {svc.name} (pid {svc.proc.pid}, restart {svc.restarts}), to "
                f"serve on {svc.address}")
        else:
            pids = ", ".join(f"{m.name} pid {m.proc.pid}" for m in svc.members)
            say(f"restarted {svc.name} ({pids}; restart {svc.restarts}), leader to serve on "
                f"{svc.address}")

    def is_serving(self, address: str) -> bool:
        with sync_channel(address, self.tls.get("client")) as channel:
            return health_check(channel, timeout=0.5)()

    def shutdown(self, grace: float = 15.0) -> None:
        for proc in reversed(self.procs):  # router first, workers last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.tls_dir is not None:
            shutil.rmtree(self.tls_dir, ignore_errors=True)

    def client_hint(self) -> str:
        """The flags ``pagedserve generate`` needs for this cluster."""
        hint = "".join(f" {flag}" for flag in self._tls_flags("client"))
        return hint + (" --api-key KEY" if self.args.api_key_file else "")


def _curl_tls(sup: Supervisor) -> str:
    client = sup.tls.get("client")
    if client is None:
        return ""
    return f" --cacert {client.ca_file} --cert {client.cert_file} --key {client.key_file}"


def share_cores_between_ranks(num_ranks: int, environ: MutableMapping[str, str] = os.environ
                              ) -> None:
    """Tensor-parallel ranks on one machine each get their share of its cores as compute
    threads (``OMP_NUM_THREADS``, inherited by the children), unless the user set it: a rank
    with a thread per core spins against the others at every all-reduce (a decode step measured
    23x slower than TP=1 that way, 2.8x with the share)."""
    if environ.get("OMP_NUM_THREADS"):
        return
    threads = max(1, (os.cpu_count() or 1) // num_ranks)
    environ["OMP_NUM_THREADS"] = str(threads)
    say(f"tensor-parallel ranks share {os.cpu_count()} cores: OMP_NUM_THREADS={threads} each "
        "(set OMP_NUM_THREADS to choose)")


def run_up(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format, "up")
    if (args.prefix_cache_isolation == "api-key" and not args.api_key_file
            and not os.environ.get("PAGEDSERVE_API_KEYS")):  # the router would refuse to start
        logger.error("--prefix-cache-isolation api-key needs API keys (--api-key-file or "
                     "PAGEDSERVE_API_KEYS)")
        return 2
    if args.tensor_parallel_size > 1:
        share_cores_between_ranks(args.tensor_parallel_size * args.workers)
    sup = Supervisor(args)
    try:
        address, http_url = sup.start()
        print(f"OpenAI-compatible HTTP API at {http_url}/v1 (try: curl{_curl_tls(sup)} "
              f"{http_url}/v1/completions -H 'Content-Type: application/json' -d "
              f"'{{\"prompt\": \"The capital of France is\", \"max_tokens\": 16}}')",
              flush=True)
        print(f"pagedserve is up: router at {address} "
              f"(try: pagedserve generate --address {address}{sup.client_hint()} "
              f"\"What is the capital of France?\")", flush=True)
        return sup.wait()
    except (RuntimeError, TimeoutError) as exc:
        logger.error("startup failed: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        sup.shutdown()
        print("pagedserve stopped", flush=True)
