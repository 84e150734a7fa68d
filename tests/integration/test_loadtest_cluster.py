"""``pagedserve loadtest`` against the real cluster (router -> scheduler -> worker over gRPC,
tiny random Llama): every request completes with the lengths it asked for, the shared-prefix
dataset shows up as cached tokens, the OpenAI backend against the router's own HTTP port sees
what the gRPC backend sees, and the server ends with every block free."""

from __future__ import annotations

import asyncio
import time

import pytest

from pagedserve.loadtest.cli import build_parser, run_loadtest
from tests.support.cluster import ClusterThread
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_factory import cpu_worker_config


@pytest.fixture(scope="module")
def cluster():
    c = ClusterThread([cpu_worker_config(tiny_llama_dir(), num_gpu_blocks=256)], http=True)
    yield c
    c.stop()


def _run(cluster: ClusterThread, *extra: str) -> dict:
    args = build_parser().parse_args(["--target", cluster.cluster.router_address, "--no-progress",
                                      "--vocab-range", "3:500", "--timeout", "120",
                                      "--request-timeout", "60", *extra])
    return asyncio.run(run_loadtest(args))


def _blocks_free(cluster: ClusterThread) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        w = cluster.stats().workers[0]
        if w.num_free_blocks == w.num_blocks:
            return True
        time.sleep(0.05)
    return False


def test_random_workload_completes_with_the_requested_lengths(cluster):
    payload = _run(cluster, "--num-requests", "24", "--input-len", "8:64", "--output-len", "8",
                   "--rate", "inf", "--max-concurrency", "12", "--seed", "3")
    s = payload["summary"]
    assert s["num_completed"] == 24 and not s["failures_by_code"]
    for r in payload["results"]:
        assert r["status"] == "OK" and r["num_output_tokens"] == 8  # EOS ignored: exact length
        assert r["e2e_s"] >= r["ttft_s"] > 0
    assert s["output_token_throughput"] > 0
    assert _blocks_free(cluster)


def test_shared_prefix_dataset_is_served_from_the_prefix_cache(cluster):
    payload = _run(cluster, "--dataset", "shared-prefix", "--num-prefixes", "2",
                   "--suffixes-per-prefix", "6", "--prefix-len", "64", "--suffix-len", "8",
                   "--output-len", "4", "--num-requests", "12", "--max-concurrency", "1")
    s = payload["summary"]
    assert s["num_completed"] == 12
    # Sequentially, every request after the first of its prefix reuses the 4 full prefix blocks.
    assert s["total_cached_tokens"] >= (12 - 2) * 64
    assert _blocks_free(cluster)


def test_openai_backend_on_the_http_port_sees_what_grpc_sees(cluster):
    """The same workload through ``--backend grpc`` (gRPC port) and ``--backend openai``
    (the router's HTTP port): every request completes, with the same prompt and output
    lengths, and usage (cached tokens included) comes back over HTTP too."""
    workload = ["--num-requests", "12", "--input-len", "8:64", "--output-len", "8",
                "--rate", "inf", "--max-concurrency", "6", "--seed", "5"]
    over_grpc = _run(cluster, *workload)
    over_http = _run(cluster, "--backend", "openai", "--base-url", cluster.cluster.http_url,
                     *workload)
    for payload in (over_grpc, over_http):
        s = payload["summary"]
        assert s["num_completed"] == 12 and not s["failures_by_code"], s
        for r in payload["results"]:
            assert r["status"] == "OK" and r["num_output_tokens"] == 8
            assert r["e2e_s"] >= r["ttft_s"] > 0
    by_index = [sorted((r["index"], r["num_prompt_tokens"]) for r in p["results"])
                for p in (over_grpc, over_http)]
    assert by_index[0] == by_index[1]
    # The second run re-sends the first run's prompts: HTTP usage reports the cache hits.
    assert over_http["summary"]["total_cached_tokens"] > 0
    assert _blocks_free(cluster)
