"""A scheduler that restarts mid-stream loses nothing a client can see: the router resubmits the
request as a continuation (prompt + tokens already streamed, recomputed) to the new scheduler,
and the stream goes on with exactly the tokens an uninterrupted run gives."""

from __future__ import annotations

import logging
import threading

from pagedserve.cluster import LocalCluster
from protos.pagedserve.v1 import common_pb2, generation_pb2
from scheduler.config import SchedulerConfig, ServerConfig
from scheduler.server import build_server
from scheduler.worker_handle import GrpcWorkerHandle
from tests.support.cluster import ClusterThread
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_factory import cpu_worker_config

MAX_TOKENS = 400


def _request(max_tokens: int, **params) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=[5, 17, 99, 123, 7, 8]),
        params=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params))


async def _restart_scheduler(lc: LocalCluster) -> None:
    """Replaces the cluster's scheduler with a fresh one on the same port and workers."""
    port = lc.scheduler.port
    addresses = tuple(f"127.0.0.1:{w.port}" for w in lc.workers)
    await lc.scheduler.stop(grace=0)  # in-flight Submit streams end UNAVAILABLE
    lc.scheduler = await build_server(
        SchedulerConfig(server=ServerConfig(host="127.0.0.1", port=port),
                        worker_addresses=addresses, log_interval_seconds=0),
        [GrpcWorkerHandle(a) for a in addresses])


def test_scheduler_restart_mid_stream_is_invisible_to_the_client(caplog):
    caplog.set_level(logging.WARNING, logger="router.servicer")
    c = ClusterThread([cpu_worker_config(tiny_llama_dir(), num_gpu_blocks=64)],
                      SchedulerConfig(log_interval_seconds=0))
    try:
        for params in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 42, "top_k": 50}):
            expected = [t for m in c.generation.Generate(_request(MAX_TOKENS, **params), timeout=60)
                        for t in m.token_ids]
            restarted = threading.Event()
            got: list[int] = []
            finish = None
            for message in c.generation.Generate(_request(MAX_TOKENS, **params), timeout=120):
                got.extend(message.token_ids)
                finish = message.finish_reason or finish
                if len(got) >= 20 and not restarted.is_set():
                    restarted.set()
                    c.run(_restart_scheduler(c.cluster))
            assert restarted.is_set()
            assert any("continuing after" in r.getMessage() for r in caplog.records), \
                "the stream finished before the restart: nothing was tested"
            caplog.clear()
            assert got == expected
            assert finish == common_pb2.FINISH_REASON_LENGTH
    finally:
        c.stop()
