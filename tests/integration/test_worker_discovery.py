"""Worker discovery by DNS (how a Kubernetes headless Service lists worker pods): the scheduler
finds its workers from a name, and admits a worker that appears later."""

from __future__ import annotations

import asyncio

import pytest

from scheduler import discovery
from scheduler.config import SchedulerConfig
from scheduler.server import build_server
from scheduler.worker_handle import GrpcWorkerHandle
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_factory import cpu_worker_config
from worker.server import start_worker_server


def test_parse_discovery_rejects_what_it_cannot_use():
    assert discovery.parse_discovery("k8s-headless=w.ns.svc:50053") == ("w.ns.svc", 50053)
    for bad in ("dns=w:1", "k8s-headless=w", "k8s-headless=:1"):
        with pytest.raises(ValueError, match="k8s-headless=NAME:PORT"):
            discovery.parse_discovery(bad)


def test_scheduler_finds_workers_by_name_and_admits_a_late_one():
    async def main():
        model = tiny_llama_dir()
        first = await start_worker_server(cpu_worker_config(model, num_gpu_blocks=16))
        server = await build_server(SchedulerConfig(
            worker_discovery=f"k8s-headless=localhost:{first.port}", log_interval_seconds=0))
        try:
            assert [w.handle.name for w in server.engine.workers] == [f"127.0.0.1:{first.port}"]
            late = await start_worker_server(cpu_worker_config(model, num_gpu_blocks=32))
            await server.engine.add_worker(GrpcWorkerHandle(f"127.0.0.1:{late.port}"))
            assert len(server.engine.workers) == 2
            assert server.engine.model_info.max_num_tokens_per_request == 32 * 16
            await late.stop()
        finally:
            await server.stop(grace=0.5)
            await first.stop()

    asyncio.run(main())
