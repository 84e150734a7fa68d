"""Metrics, dashboards and alerts an operator can rely on, proven on a real local cluster.

One module-scoped cluster (router -> scheduler -> worker over gRPC on 127.0.0.1, a tiny random
Llama, every /metrics endpoint on a free port) runs a known workload: three greedy requests with
``ignore_eos`` and known prompt/output lengths, and one request the router refuses with
INVALID_ARGUMENT. Each endpoint must report exactly what happened; a real Prometheus must read
the same values back through PromQL; every dashboard and alert query must name only series the
live endpoints declare; the scheduler's periodic INFO line must carry its fields. The cancelled
stream runs last (it adds counts the exact checks above do not expect).
"""

from __future__ import annotations

import json
import logging
import random
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml

from protos.pagedserve.v1 import common_pb2, generation_pb2
from scheduler.config import SchedulerConfig
from tests.support.cluster import ClusterThread
from tests.support.prometheus import PrometheusServer
from tests.support.promql import grafana_to_promql, metric_names, scraped_names, scraped_samples
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_factory import cpu_worker_config
from worker.cpu_kernels import cpu_kernels

ROOT = Path(__file__).resolve().parents[2]
NUM_BLOCKS = 64
BLOCK_SIZE = 16
#: (prompt length, max_tokens) of the requests that finish normally.
WORKLOAD = ((20, 5), (33, 7), (40, 9))
NUM_PROMPT_TOKENS = sum(p for p, _ in WORKLOAD)
NUM_GENERATED_TOKENS = sum(n for _, n in WORKLOAD)
#: Full blocks each finished request leaves in the prefix cache: its K/V covers
#: prompt + output - 1 tokens (the last sampled token is never computed).
NUM_CACHED_BLOCKS = sum((p + n - 1) // BLOCK_SIZE for p, n in WORKLOAD)
SECRET_PROMPT = "zebra-secret-prompt"
CPU_ISAS = ("avx512", "avx2", "portable")  # cpu_ops.ISAS


def _request(ids: list[int] | None, max_tokens: int, text: str = "",
             **params: Any) -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params)
    if ids is None:
        return generation_pb2.GenerateRequest(text=text, params=sampling)
    return generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=ids),
                                          params=sampling)


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def _value(text: str, name: str, **labels: str) -> float | None:
    return scraped_samples(text).get((name, frozenset(labels.items())))


def _eventually(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterThread]:
    c = ClusterThread([cpu_worker_config(tiny_llama_dir(), block_size=BLOCK_SIZE,
                                         num_gpu_blocks=NUM_BLOCKS)],
                      SchedulerConfig(log_interval_seconds=0.2), metrics=True)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def urls(cluster: ClusterThread) -> dict[str, str]:
    found = cluster.cluster.metrics_urls
    assert set(found) == {"router", "scheduler", "worker-0"}
    return found


@pytest.fixture(scope="module")
def workload(cluster: ClusterThread, urls: dict[str, str]) -> dict[str, str]:
    """Runs the known workload once; returns each endpoint's page after it settled."""
    rng = random.Random(7)
    for num_prompt, max_tokens in WORKLOAD:  # distinct random prompts: no prefix-cache hits
        ids = [rng.randrange(3, 500) for _ in range(num_prompt)]
        msgs = list(cluster.generation.Generate(_request(ids, max_tokens, temperature=0.0),
                                                timeout=60))
        assert sum(len(m.token_ids) for m in msgs) == max_tokens
    with pytest.raises(grpc.RpcError) as refused:
        list(cluster.generation.Generate(_request([5, 6, 7], 4, temperature=-1.0), timeout=10))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def settled() -> bool:  # the router records a request after its last message is sent
        page = _scrape(urls["router"])
        return _value(page, "pagedserve_router_requests_total", outcome="ok", code="OK",
                      protocol="grpc") == 3
    _eventually(settled, "the router to record three finished requests")
    return {name: _scrape(url) for name, url in urls.items()}


def test_router_endpoint_counts_requests_by_code_and_tokens(workload: dict[str, str]) -> None:
    page = workload["router"]
    assert _value(page, "pagedserve_router_requests_total", outcome="ok", code="OK",
                  protocol="grpc") == 3
    assert _value(page, "pagedserve_router_requests_total", outcome="rejected", protocol="grpc",
                  code="INVALID_ARGUMENT") == 1
    assert _value(page, "pagedserve_router_prompt_tokens_total",
                  protocol="grpc") == NUM_PROMPT_TOKENS
    assert _value(page, "pagedserve_router_generated_tokens_total",
                  protocol="grpc") == NUM_GENERATED_TOKENS
    assert _value(page, "pagedserve_router_streams_in_flight", protocol="grpc") == 0
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                      "time_per_output_token_seconds"):  # refusals stay out of latencies
        assert _value(page, f"pagedserve_router_{histogram}_count", protocol="grpc") == 3, \
            histogram
    # one gap per token after the first
    assert _value(page, "pagedserve_router_inter_token_latency_seconds_count",
                  protocol="grpc") == (
        NUM_GENERATED_TOKENS - len(WORKLOAD))
    assert _value(page, "vllm:time_to_first_token_seconds_count", model_name="model",
                  protocol="grpc") == 3


def test_scheduler_endpoint_counts_tokens_finished_requests_and_blocks(
        cluster: ClusterThread, workload: dict[str, str]) -> None:
    page = workload["scheduler"]
    worker = cluster.cluster.engine.workers[0].handle.name
    assert _value(page, "pagedserve_scheduler_generated_tokens_total") == NUM_GENERATED_TOKENS
    assert _value(page, "vllm:generation_tokens_total", model_name="model") == (
        NUM_GENERATED_TOKENS)
    assert _value(page, "pagedserve_scheduler_prompt_tokens_total") == NUM_PROMPT_TOKENS
    assert _value(page, "pagedserve_scheduler_step_tokens_sum") == (
        NUM_PROMPT_TOKENS + NUM_GENERATED_TOKENS)
    assert _value(page, "pagedserve_scheduler_requests_finished_total",
                  finished_reason="length") == 3
    assert _value(page, "pagedserve_scheduler_placements_total", reason="only") == 3
    assert _value(page, "pagedserve_scheduler_request_queue_time_seconds_count") == 3
    assert _value(page, "pagedserve_scheduler_prefix_cache_queried_tokens_total") == (
        NUM_PROMPT_TOKENS)
    assert _value(page, "pagedserve_scheduler_prefix_cache_hit_tokens_total") == 0
    for gauge in ("running", "waiting", "swapped"):
        assert _value(page, f"pagedserve_scheduler_requests_{gauge}") == 0
    assert _value(page, "pagedserve_scheduler_workers_healthy") == 1
    blocks = {s: _value(page, "pagedserve_scheduler_kv_blocks", worker=worker, state=s)
              for s in ("used", "cached_free", "free")}
    assert blocks == {"used": 0, "cached_free": NUM_CACHED_BLOCKS,
                      "free": NUM_BLOCKS - NUM_CACHED_BLOCKS}
    assert _value(page, "pagedserve_scheduler_kv_cache_usage_ratio", worker=worker) == 0


def test_worker_endpoint_reports_pool_work_memory_and_backend(workload: dict[str, str]) -> None:
    page = workload["worker-0"]
    assert _value(page, "pagedserve_worker_kv_blocks_total", rank="0") == NUM_BLOCKS
    assert _value(page, "pagedserve_worker_sampled_tokens_total", rank="0") == NUM_GENERATED_TOKENS
    assert _value(page, "pagedserve_worker_computed_tokens_total", rank="0") == (
        NUM_PROMPT_TOKENS + NUM_GENERATED_TOKENS - len(WORKLOAD))
    steps = _value(page, "pagedserve_worker_forward_duration_seconds_count", rank="0")
    assert steps is not None and steps >= max(n for _, n in WORKLOAD)
    assert _value(page, "pagedserve_worker_sampling_duration_seconds_count", rank="0") == steps
    assert (_value(page, "pagedserve_worker_model_weight_bytes", rank="0") or 0) > 0
    assert (_value(page, "pagedserve_worker_device_memory_allocated_bytes", rank="0") or 0) > 0
    assert _value(page, "pagedserve_worker_attention_backend_info", rank="0", backend="torch",
                  device="cpu", worker_id="test-worker") == 1
    kernels = cpu_kernels(torch.device("cpu"), torch.float32)  # what this CPU worker runs
    assert kernels.isa in (*CPU_ISAS, "off")
    # a tiny random model: fp32 weights have no exact 8-bit codes, so they stay fp32 panels
    weights = "torch" if kernels.isa == "off" else "fp32"
    assert _value(page, "pagedserve_worker_cpu_kernels_info", rank="0", isa=kernels.isa,
                  available=",".join(kernels.available), weights=weights) == 1


def test_prometheus_scrapes_the_cluster_and_promql_returns_the_counts(
        tmp_path: Path, urls: dict[str, str], workload: dict[str, str]) -> None:
    jobs = {f"pagedserve-{name.split('-')[0]}": [url.split("/")[2]] for name, url in urls.items()}
    with PrometheusServer(tmp_path / "prom", jobs) as prom:
        prom.wait_for_targets_up()
        prom.wait_for_value("sum(pagedserve_router_generated_tokens_total)",
                            NUM_GENERATED_TOKENS)
        assert prom.query_value("sum(vllm:generation_tokens_total)") == NUM_GENERATED_TOKENS
        assert prom.query_value("sum(pagedserve_scheduler_requests_finished_total)") == 3
        assert prom.query_value('sum(pagedserve_router_requests_total{code="OK"})') == 3
        assert prom.query_value(
            'sum(pagedserve_router_requests_total{outcome="rejected"})') == 1
        assert prom.query_value("sum(vllm:prompt_tokens_total)") == NUM_PROMPT_TOKENS
        assert prom.query_value(
            'sum(pagedserve_scheduler_kv_blocks{state="cached_free"})') == NUM_CACHED_BLOCKS
        assert prom.query_value('pagedserve_worker_kv_blocks_total{job="pagedserve-worker"}') == (
            NUM_BLOCKS)
        assert prom.query_value('sum(up{job=~"pagedserve-.*"})') == 3


def test_dashboard_and_alerts_name_only_series_the_live_endpoints_declare(
        workload: dict[str, str]) -> None:
    live = set().union(*(scraped_names(page) for page in workload.values())) | {"up"}
    dashboard = json.loads((ROOT / "deploy/grafana/pagedserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*(metric_names(grafana_to_promql(e)) for e in exprs))
    assert used and used <= live, sorted(used - live)


def test_scheduler_logs_a_periodic_info_line_without_prompts(
        cluster: ClusterThread, caplog: pytest.LogCaptureFixture) -> None:
    worker = cluster.cluster.engine.workers[0].handle.name
    def stats_lines() -> list[logging.LogRecord]:
        return [r for r in list(caplog.records) if r.name == "scheduler.observability"
                and r.levelno == logging.INFO and "throughput" in r.getMessage()]

    with caplog.at_level(logging.INFO):
        msgs = list(cluster.generation.Generate(
            _request(None, 120, text=SECRET_PROMPT, temperature=0.0), timeout=60))
        assert sum(len(m.token_ids) for m in msgs) == 120
        num_before = len(stats_lines())
        _eventually(lambda: len(stats_lines()) >= num_before + 2,
                    "two more stats lines after the request")
    lines = stats_lines()
    text = lines[-1].getMessage()
    for field in ("prompt throughput", "generation throughput", "running 0", "waiting 0",
                  "swapped 0", f"KV usage {worker}=0.0%", "prefix cache hit rate"):
        assert field in text, (field, text)
    assert any(_throughput(r.getMessage(), "generation") > 0 for r in lines), [
        r.getMessage() for r in lines]
    assert not any(SECRET_PROMPT in r.getMessage() for r in caplog.records)


def _throughput(message: str, kind: str) -> float:
    return float(message.split(f"{kind} throughput ")[1].split(" ")[0])


def test_cancelled_stream_is_counted_and_frees_its_blocks(
        cluster: ClusterThread, urls: dict[str, str], workload: dict[str, str]) -> None:
    worker = cluster.cluster.engine.workers[0].handle.name
    before = _value(_scrape(urls["scheduler"]), "pagedserve_scheduler_requests_finished_total",
                    finished_reason="abort") or 0
    ids = list(range(10, 60))  # 50 prompt tokens: 4 blocks once decoding starts
    call = cluster.generation.Generate(_request(ids, 400, temperature=0.0), timeout=60)
    next(call)  # the first token arrived: the request holds blocks on the worker
    router, scheduler = _scrape(urls["router"]), _scrape(urls["scheduler"])
    assert _value(router, "pagedserve_router_streams_in_flight", protocol="grpc") == 1
    assert _value(scheduler, "pagedserve_scheduler_requests_running") == 1
    used = _value(scheduler, "pagedserve_scheduler_kv_blocks", worker=worker, state="used")
    assert used is not None and used >= 4
    ratio = _value(scheduler, "pagedserve_scheduler_kv_cache_usage_ratio", worker=worker)
    assert ratio == pytest.approx(used / NUM_BLOCKS)
    call.cancel()

    def recorded() -> bool:
        r, s = _scrape(urls["router"]), _scrape(urls["scheduler"])
        return (_value(r, "pagedserve_router_requests_total", outcome="cancelled",
                       code="CANCELLED", protocol="grpc") == 1
                and _value(r, "pagedserve_router_streams_in_flight", protocol="grpc") == 0
                and _value(s, "pagedserve_scheduler_requests_finished_total",
                           finished_reason="abort") == before + 1
                and _value(s, "pagedserve_scheduler_kv_blocks", worker=worker,
                           state="used") == 0)
    _eventually(recorded, "the cancel to be counted and its blocks freed")
