"""``run_loadtest`` against a real grpc.aio ``Generation`` server on 127.0.0.1:0.

The server is scripted: it streams one token per message with small sleeps, reports usage (every
prompt's first 16 tokens count as cached), and refuses every ``FAIL_EVERY``-th request with
RESOURCE_EXHAUSTED, as an overloaded router would. Latencies are checked against the timestamps
the harness recorded (``tests/support/loadtest_timings.py``), never against the sleeps: no
assertion depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from pagedserve.loadtest.cli import build_parser, main, run_loadtest
from protos.pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.support.loadtest_timings import RecordedTimings, check_latencies

FAIL_EVERY = 5
TOKEN_DELAY_S = 0.002  # the sleeps make latencies non-trivial; no assertion depends on them
FIRST_TOKEN_DELAY_S = 0.01
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ScriptedGeneration(generation_pb2_grpc.GenerationServicer):
    def __init__(self) -> None:
        self.requests: list[generation_pb2.GenerateRequest] = []

    async def Generate(self, request, context):
        self.requests.append(request)
        index = int(request.request_id.rsplit("-", 1)[1])
        if index % FAIL_EVERY == FAIL_EVERY - 1:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        num_prompt = len(request.token_ids.ids) or len(request.text.split())
        max_tokens = request.params.max_tokens
        await asyncio.sleep(FIRST_TOKEN_DELAY_S)
        for i in range(max_tokens):
            if i:
                await asyncio.sleep(TOKEN_DELAY_S)
            last = i == max_tokens - 1
            yield generation_pb2.GenerateResponse(
                request_id=request.request_id,
                text=f" t{i}",
                token_ids=[100 + i],
                finish_reason=common_pb2.FINISH_REASON_LENGTH if last else 0,
                usage=common_pb2.Usage(
                    prompt_tokens=num_prompt,
                    completion_tokens=max_tokens,
                    cached_tokens=min(16, num_prompt),
                )
                if last
                else None,
            )


async def _with_server(fn: Callable[[str, ScriptedGeneration], Awaitable[Any]]) -> Any:
    server = grpc.aio.server()
    servicer = ScriptedGeneration()
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return await fn(f"127.0.0.1:{port}", servicer)
    finally:
        await server.stop(0)


def _args(target: str, *extra: str):
    return build_parser().parse_args(
        [
            "--target",
            target,
            "--no-progress",
            "--input-len",
            "8:24",
            "--output-len",
            "4:8",
            "--timeout",
            "30",
            "--request-timeout",
            "10",
            *extra,
        ]
    )


def test_run_counts_failures_throughput_and_sends_controlled_requests(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, plot = tmp_path / "results.json", tmp_path / "results.png"
    timings = RecordedTimings(monkeypatch)

    async def go(target: str, servicer: ScriptedGeneration):
        args = _args(
            target,
            "--num-requests",
            "30",
            "--warmup",
            "3",
            "--rate",
            "200",
            "--max-concurrency",
            "8",
            "--goodput",
            "ttft:2000",
            "tpot:1000",
            "--out",
            str(out),
            "--plot",
            str(plot),
        )
        return await run_loadtest(args), servicer.requests

    payload, requests = asyncio.run(_with_server(go))
    s = payload["summary"]
    assert len(requests) == 33  # 3 warmup + 30 measured
    assert all(r.params.ignore_eos and r.params.temperature == 0 for r in requests)
    assert all(4 <= r.params.max_tokens <= 8 and 8 <= len(r.token_ids.ids) <= 24 for r in requests)
    # Measured requests are indices 3..32: those with index % 5 == 4 fail.
    expected_failed = sum(1 for i in range(3, 33) if i % FAIL_EVERY == FAIL_EVERY - 1)
    assert s["num_requests"] == 30 and s["num_warmup"] == 3
    assert s["failures_by_code"] == {"RESOURCE_EXHAUSTED": expected_failed}
    assert s["num_completed"] == 30 - expected_failed and s["num_not_sent"] == 0
    check_latencies(payload, timings)  # each streamed message is one token; usage agrees
    ok = [r for r in payload["results"] if r["status"] == "OK"]
    assert s["request_throughput"] == pytest.approx(len(ok) / s["duration_s"])
    assert s["output_token_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration_s"])
    assert s["total_cached_tokens"] == sum(min(16, r["num_prompt_tokens"]) for r in ok)
    good = [r for r in ok if r["ttft_s"] <= 2.0 and r["tpot_s"] <= 1.0]  # the --goodput SLOs
    assert s["num_good"] == len(good)
    assert s["goodput"] == pytest.approx(len(good) / s["duration_s"])

    saved = json.loads(out.read_text())
    assert saved["config"]["num_requests"] == 30 and saved["config"]["rate"] == 200
    assert saved["summary"]["failures_by_code"] == s["failures_by_code"]
    assert len(saved["results"]) == 30
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_concurrency_cap_is_respected() -> None:
    in_flight = {"now": 0, "max": 0}

    async def go(target: str, servicer: ScriptedGeneration):
        original = servicer.Generate

        async def counting(request, context):
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
            try:
                async for msg in original(request, context):
                    yield msg
            finally:
                in_flight["now"] -= 1

        servicer.Generate = counting  # type: ignore[method-assign]
        return await run_loadtest(_args(target, "--num-requests", "20", "--max-concurrency", "3"))

    payload = asyncio.run(_with_server(go))
    assert payload["summary"]["num_requests"] == 20
    assert in_flight["max"] <= 3


def test_request_deadline_and_overall_timeout_bound_the_run() -> None:
    async def go(target: str, servicer: ScriptedGeneration):
        async def never_finishes(request, context):  # one token, then silence until cancelled
            yield generation_pb2.GenerateResponse(request_id=request.request_id, token_ids=[1])
            await asyncio.Event().wait()

        servicer.Generate = never_finishes  # type: ignore[method-assign]
        # Only deadlines end these requests. Arrivals at 10/s: the last is sent ~4.7 s in
        # (seeded), long after the 1 s run timeout; the first is sent at 0 with a 0.2 s deadline.
        args = _args(
            target,
            "--num-requests",
            "40",
            "--output-len",
            "200",
            "--rate",
            "10",
            "--request-timeout",
            "0.2",
            "--timeout",
            "1",
        )
        return await run_loadtest(args)

    payload = asyncio.run(_with_server(go))
    s = payload["summary"]
    assert s["num_completed"] == 0
    assert s["failures_by_code"].get("DEADLINE_EXCEEDED", 0) >= 1
    assert s["timed_out"] and s["num_not_sent"] > 0


def test_sweep_runs_each_rate_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"

    async def go(target: str, servicer: ScriptedGeneration):
        args = _args(
            target,
            "--num-requests",
            "8",
            "--sweep",
            "50,inf",
            "--out",
            str(out),
            "--plot",
            str(plot),
        )
        return await run_loadtest(args), servicer.requests

    payload, requests = asyncio.run(_with_server(go))
    assert [p["rate"] for p in payload["sweep"]] == [50, math.inf]
    assert all(p["summary"]["num_requests"] == 8 for p in payload["sweep"])
    # Different prompts per rate, so a prefix cache cannot favour later rates.
    assert len({tuple(r.token_ids.ids) for r in requests}) == 16
    assert "rate" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert [p["rate"] for p in saved["sweep"]] == [50, "inf"]
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_text_prompts_from_json_file(tmp_path: Path) -> None:
    path = tmp_path / "reqs.json"
    path.write_text(json.dumps([{"prompt": "one two three", "max_tokens": 3}]))

    async def go(target: str, servicer: ScriptedGeneration):
        args = _args(
            target, "--dataset", "json", "--dataset-path", str(path), "--num-requests", "2"
        )
        return await run_loadtest(args), servicer.requests

    payload, requests = asyncio.run(_with_server(go))
    assert [r.text for r in requests] == ["one two three"] * 2
    assert payload["summary"]["total_prompt_tokens"] == 6  # from the server's usage
    assert payload["summary"]["total_output_tokens"] == 6


def test_main_reports_bad_options_with_exit_code_2(tmp_path: Path, capsys) -> None:
    assert main(["--dataset", "json", "--no-progress"]) == 2
    assert "--dataset-path" in capsys.readouterr().err
    assert main(["--goodput", "speed:3", "--no-progress"]) == 2
