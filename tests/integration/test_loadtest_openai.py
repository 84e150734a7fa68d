"""``run_loadtest --backend openai`` against a real HTTP server streaming server-sent events
(stdlib ``ThreadingHTTPServer`` on 127.0.0.1:0), over httpx and over urllib in a thread.

Latencies are checked against the timestamps the harness recorded (``tests/support/
loadtest_timings.py``), never against the server's sleeps: no assertion depends on how fast
the machine is."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from pagedserve.loadtest import backends
from pagedserve.loadtest.cli import build_parser, run_loadtest
from tests.support.loadtest_timings import RecordedTimings, check_latencies

TOKEN_DELAY_S = 0.002  # gaps between tokens, so latencies are not all ~0; nothing asserts on it


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    bodies: ClassVar[list[dict]] = []
    lock: ClassVar[threading.Lock] = threading.Lock()

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send_json(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send_json(200, {"object": "list", "data": [{"id": "fake-model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.bodies.append(body)
            number = len(self.bodies)
        if number % 4 == 0:
            self._send_json(429, {"error": "too many requests"})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        n = body["max_tokens"]
        for i in range(n):
            time.sleep(TOKEN_DELAY_S)
            chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {
            "prompt_tokens": len(body["prompt"]),
            "completion_tokens": n,
            "prompt_tokens_details": {"cached_tokens": 4},
        }
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.bodies = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("use_httpx", [False, True], ids=["urllib", "httpx"])
def test_openai_backend_streams_and_counts(server: str, use_httpx: bool, monkeypatch) -> None:
    if use_httpx and backends.httpx is None:
        pytest.fail("httpx not installed: `make test` installs the bench extra")
    if not use_httpx:
        monkeypatch.setattr(backends, "httpx", None)
    timings = RecordedTimings(monkeypatch)
    args = build_parser().parse_args(
        [
            "--backend",
            "openai",
            "--base-url",
            server,
            "--num-requests",
            "12",
            "--input-len",
            "10",
            "--output-len",
            "5",
            "--max-concurrency",
            "4",
            "--no-progress",
            "--timeout",
            "30",
        ]
    )
    payload = asyncio.run(run_loadtest(args))
    s = payload["summary"]
    assert s["num_requests"] == 12
    assert s["failures_by_code"] == {"HTTP_429": 3}
    assert s["num_completed"] == 9
    assert s["total_output_tokens"] == 45 and s["total_prompt_tokens"] == 90
    assert s["total_cached_tokens"] == 36
    check_latencies(payload, timings)  # TTFT, ITL, TPOT and E2E from the recorded timestamps
    assert sum(len(r["itls_s"]) for r in payload["results"]) == 9 * (5 - 1)  # gaps after token 1
    assert s["output_token_throughput"] == pytest.approx(45 / s["duration_s"])
    body = _Handler.bodies[0]
    assert body["model"] == "fake-model" and body["stream"] and body["ignore_eos"]
    assert body["temperature"] == 0 and body["max_tokens"] == 5 and len(body["prompt"]) == 10


def test_openai_backend_unreachable_server_is_a_failure_not_a_crash(monkeypatch) -> None:
    monkeypatch.setattr(backends, "httpx", None)
    args = build_parser().parse_args(
        [
            "--backend",
            "openai",
            "--base-url",
            "http://127.0.0.1:9",
            "--model",
            "m",
            "--num-requests",
            "2",
            "--no-progress",
            "--timeout",
            "10",
        ]
    )
    s = asyncio.run(run_loadtest(args))["summary"]
    assert s["failures_by_code"] == {"UNAVAILABLE": 2}
