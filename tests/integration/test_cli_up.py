"""``pagedserve up`` as a user runs it: separate router, scheduler and worker processes; then
``pagedserve generate`` streams from it; then Ctrl-C (SIGINT) stops every process cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request

import pytest

from router.cache_salt import MAX_CACHE_SALT_BYTES
from tests.support.tiny_llama import tiny_llama_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ctrl_c(proc: subprocess.Popen) -> int:
    """Stops ``up`` as Ctrl-C in a terminal does (SIGINT to its process group); its exit code."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("pagedserve up did not stop on Ctrl-C")


def test_up_generate_and_ctrl_c(tmp_path):
    model = tiny_llama_dir()
    port, http_port = _free_port(), _free_port()
    # The child keeps its own copy of the descriptor, so ours can close once it has started.
    with open(tmp_path / "up.log", "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.cli", "up", "--model", str(model), "--workers", "2",
             "--port", str(port), "--http-port", str(http_port), "--kv-cache-memory-gib", "0.01",
             "--log-level", "WARNING"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "pagedserve is up" not in (tmp_path / "up.log").read_text():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "cluster did not start"
            time.sleep(0.3)
        out = subprocess.run(
            [sys.executable, "-m", "pagedserve.cli", "generate", "--address", f"127.0.0.1:{port}",
             "--raw", "--max-tokens", "8", "--ignore-eos", "hello world"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip(), "no text streamed"
        bad = subprocess.run(
            [sys.executable, "-m", "pagedserve.cli", "generate", "--address", f"127.0.0.1:{port}",
             "--raw", "--temperature", "-1", "hello"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
        salted = [subprocess.run(
            [sys.executable, "-m", "pagedserve.cli", "generate", "--address", f"127.0.0.1:{port}",
             "--raw", "--max-tokens", "2", "--cache-salt", salt, "hello"], capture_output=True,
            text=True, timeout=60) for salt in ("tenant-a", "x" * (MAX_CACHE_SALT_BYTES + 1))]
        assert salted[0].returncode == 0, salted[0].stderr
        assert salted[1].returncode == 1 and "INVALID_ARGUMENT" in salted[1].stderr
        assert "cache_salt" in salted[1].stderr  # the salt reached the router, which checked it
        # The OpenAI-compatible API is on, at the URL it printed, as the README's curl uses it.
        url = f"http://127.0.0.1:{http_port}"
        assert f"OpenAI-compatible HTTP API at {url}/v1 (try: curl" in (
            tmp_path / "up.log").read_text()
        request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(
            {"prompt": "hello world", "max_tokens": 8, "ignore_eos": True}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            body = json.loads(resp.read())
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 8
    finally:
        code = _ctrl_c(proc)
    text = (tmp_path / "up.log").read_text()
    assert code == 0, text
    assert "pagedserve stopped" in text
    # What it waited for while it started, in order (stderr; WARNING keeps the children quiet).
    progress = [line for line in text.splitlines() if line.startswith("up: ")]
    ready = [line.split(" ready on ")[0] for line in progress if " ready on " in line]
    assert ready == ["up: worker 0", "up: worker 1", "up: scheduler", "up: router"], text
    assert f"up: router ready on 127.0.0.1:{port} after " in text
    assert any(line.startswith("up: started worker 1 (pid ") for line in progress), text
    leftover = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "child processes left running"


def _wait_for(predicate, what: str, log, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}; up's log:\n{log.read_text()}"
        time.sleep(0.3)
    return value


def test_up_restarts_a_killed_worker_and_the_scheduler_readmits_it(tmp_path):
    """SIGKILL a worker under ``up``: the cluster keeps serving, ``up`` starts the worker again
    (same port) and says so, the scheduler re-admits the new instance (its first step planned for
    the old instance is refused, not computed on empty KV memory), and later requests run on it,
    token-exact with the surviving worker."""
    import grpc

    from protos.pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc

    model = tiny_llama_dir()
    port, http_port, sched_port = _free_port(), _free_port(), _free_port()
    log = tmp_path / "up.log"
    with open(log, "w+") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.cli", "up", "--model", str(model), "--workers", "2",
             "--port", str(port), "--http-port", str(http_port), "--scheduler-port",
             str(sched_port), "--kv-cache-memory-gib", "0.01", "--log-level", "WARNING"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def generate(prompt: str) -> str:
        res = subprocess.run(
            [sys.executable, "-m", "pagedserve.cli", "generate", "--address",
             f"127.0.0.1:{port}", "--raw", "--max-tokens", "8", "--ignore-eos", prompt],
            capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout

    channel = grpc.insecure_channel(f"127.0.0.1:{sched_port}")
    stub = scheduler_pb2_grpc.SchedulerStub(channel)

    def workers() -> dict[str, scheduler_pb2.WorkerStats]:
        return {w.worker_id: w for w in stub.GetStats(scheduler_pb2.StatsRequest(),
                                                       timeout=10).workers}

    try:
        _wait_for(lambda: "pagedserve is up" in log.read_text(), "cluster did not start", log,
                  timeout=240)
        line = next(x for x in log.read_text().splitlines()
                    if x.startswith("up: started worker 0 (pid "))
        pid = int(line.split("(pid ")[1].split(")")[0])
        address = line.rsplit("to serve on ", 1)[1]
        reference = [generate(f"hello {i}") for i in range(4)]
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: "up: worker 0 serving again on" in log.read_text(),
                  "worker 0 was not restarted", log)
        assert f"up: worker 0 (pid {pid}) exited with code -9" in log.read_text()
        assert "up: restarted worker 0 (pid " in log.read_text()
        # Served throughout, and the scheduler takes the new instance back: the steps it runs
        # there grow once requests arrive (the first one there may be refused and moved).
        before = workers()[address].num_steps

        def used_again() -> bool:
            assert [generate(f"hello {i}") for i in range(4)] == reference
            w = workers()[address]
            return w.healthy and w.num_steps > before

        _wait_for(used_again, "the restarted worker was not used again", log, timeout=60)
    finally:
        channel.close()
        code = _ctrl_c(proc)
    assert code == 0, log.read_text()


def test_up_tls_with_api_keys_end_to_end(tmp_path):
    """``up --tls --api-key-file``: a throwaway CA; the printed client flags plus a key stream
    over mTLS; no key is UNAUTHENTICATED, no certificate fails the handshake; HTTPS with the
    client certificate works; the certificates are removed at exit."""
    model = tiny_llama_dir()
    port, http_port = _free_port(), _free_port()
    key = "up-test-key-0123456789"
    (tmp_path / "keys").write_text(f"tester:{key}\n")
    log_path = tmp_path / "up.log"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.cli", "up", "--model", str(model), "--tls",
             "--api-key-file", str(tmp_path / "keys"), "--port", str(port),
             "--http-port", str(http_port), "--kv-cache-memory-gib", "0.01",
             "--log-level", "WARNING"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "pagedserve is up" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "cluster did not start"
            time.sleep(0.3)
        text = log_path.read_text()
        tls_dir = text.split("throwaway CA and certificates in ")[1].split(" ")[0]
        client = [f"--tls-{kind}-file" for kind in ("cert", "key", "ca")]
        paths = [f"{tls_dir}/client.crt", f"{tls_dir}/client.key", f"{tls_dir}/ca.crt"]
        flags = [x for pair in zip(client, paths, strict=True) for x in pair]
        assert " ".join(flags) + " --api-key KEY" in text  # the hint it printed

        def generate(*extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "pagedserve.cli", "generate", "--address",
                 f"127.0.0.1:{port}", "--raw", "--max-tokens", "4", "--ignore-eos", *extra,
                 "hello"], capture_output=True, text=True, timeout=60)

        served = generate(*flags, "--api-key", key)
        assert served.returncode == 0 and served.stdout.strip(), served.stderr
        no_key = generate(*flags)
        assert no_key.returncode == 1 and "UNAUTHENTICATED" in no_key.stderr
        no_cert = generate("--tls-ca-file", paths[2], "--api-key", key)
        assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr
        context = ssl.create_default_context(cafile=paths[2])
        context.load_cert_chain(paths[0], paths[1])
        url = f"https://127.0.0.1:{http_port}"
        assert f"OpenAI-compatible HTTP API at {url}/v1" in text
        request = urllib.request.Request(f"{url}/v1/models",
                                         headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=60, context=context) as resp:
            assert json.loads(resp.read())["data"]
    finally:
        code = _ctrl_c(proc)
    assert code == 0, log_path.read_text()
    assert not os.path.exists(tls_dir), "certificates left behind"
    assert key not in log_path.read_text()
