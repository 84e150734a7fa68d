"""TLS and mutual TLS, service by service, with real certificates from ``pagedserve.certs``:
the handshake succeeds with the right certificates and fails without them, and only the
scheduler's certificate may call a worker's ``Worker`` service (only the router's, the
scheduler's ``Scheduler`` service)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.certs import LocalCA, write_local_pki
from pagedserve.client import AsyncClient
from pagedserve.cluster import start_local_cluster
from pagedserve.core.grpc_util import TlsConfig, aio_channel
from protos.pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.tls_calls import https_models, status_code
from tests.support.worker_factory import cpu_worker, cpu_worker_config
from worker.server import start_worker_server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsConfig]:
    return write_local_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> TlsConfig:
    """A certificate named as the scheduler, from another CA."""
    return LocalCA("another CA").write(tmp_path_factory.mktemp("other"), "scheduler",
                                       "pagedserve-scheduler")


def _ca_only(pki: dict[str, TlsConfig]) -> TlsConfig:
    return TlsConfig(ca_file=pki["client"].ca_file)


async def _worker_calls(address: str, tls: TlsConfig | None) -> tuple[grpc.StatusCode, ...]:
    """(health, GetInfo, Step, Reset) status codes for a caller with ``tls``."""
    async with aio_channel(address, tls) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        return (await status_code(health.Check(health_pb2.HealthCheckRequest(), timeout=10)),
                await status_code(stub.GetInfo(worker_pb2.WorkerInfoRequest(), timeout=10)),
                await status_code(stub.Step(worker_pb2.StepRequest(step_id=1), timeout=10)),
                await status_code(stub.Reset(worker_pb2.ResetRequest(), timeout=10)))


def test_worker_mtls_admits_only_the_scheduler_to_the_worker_service(pki, stranger) -> None:
    model = tiny_llama_dir()
    cfg = cpu_worker_config(model, block_size=4)
    cfg = replace(cfg, server=replace(cfg.server, tls=pki["worker"]))

    async def run() -> dict[str, tuple[grpc.StatusCode, ...]]:
        started = await start_worker_server(cfg, cpu_worker(model, block_size=4))
        address = f"127.0.0.1:{started.port}"
        try:
            return {name: await _worker_calls(address, tls) for name, tls in {
                "scheduler": pki["scheduler"], "router": pki["router"], "client": pki["client"],
                "no client certificate": _ca_only(pki), "plaintext": None,
                "other CA": stranger}.items()}
        finally:
            await started.stop()

    codes = asyncio.run(run())
    ok, denied, down = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED, \
        grpc.StatusCode.UNAVAILABLE
    assert codes["scheduler"][:2] == (ok, ok) and codes["scheduler"][3] == ok
    assert codes["scheduler"][2] != denied  # an empty step: refused or run, but admitted
    for other in ("router", "client"):  # a valid certificate, but not the scheduler's
        assert codes[other] == (ok, denied, denied, denied), other
    for refused in ("no client certificate", "plaintext", "other CA"):  # no handshake
        assert codes[refused] == (down,) * 4, refused


def test_cluster_over_mtls_serves_grpc_and_https_and_refuses_strangers(pki) -> None:
    model = tiny_llama_dir()

    async def run() -> dict[str, object]:
        cluster = await start_local_cluster([cpu_worker_config(model, block_size=4)],
                                            http=True, tls=pki)
        out: dict[str, object] = {}
        try:
            async with AsyncClient(cluster.router_address, tls=pki["client"]) as client:
                out["text"] = await client.generate_text(
                    "hello", max_tokens=4, ignore_eos=True, timeout=60)
            async with AsyncClient(cluster.router_address, tls=_ca_only(pki)) as client:
                out["no cert"] = await status_code(client.model_info(timeout=10))
            async with AsyncClient(cluster.router_address) as client:
                out["plaintext"] = await status_code(client.model_info(timeout=10))
            async with aio_channel(cluster.scheduler_address, pki["client"]) as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                out["scheduler as client"] = await status_code(
                    stub.GetStats(scheduler_pb2.StatsRequest(), timeout=10))
            async with aio_channel(cluster.scheduler_address, pki["router"]) as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                out["scheduler as router"] = await status_code(
                    stub.GetStats(scheduler_pb2.StatsRequest(), timeout=10))
            out["load test"] = await _load_test_statuses(cluster, pki["client"])
            out["https"] = await https_models(cluster.http_url, pki["client"])
            out["https no cert"] = await https_models(cluster.http_url, _ca_only(pki))
        finally:
            await cluster.stop()
        return out

    out = asyncio.run(run())
    assert isinstance(out["text"], str) and out["text"]
    assert out["no cert"] == out["plaintext"] == grpc.StatusCode.UNAVAILABLE
    assert out["scheduler as client"] == grpc.StatusCode.PERMISSION_DENIED
    assert out["scheduler as router"] == grpc.StatusCode.OK
    assert out["load test"] == {"grpc": "OK", "openai": "OK"}
    assert out["https"] == 200
    assert out["https no cert"] == "handshake failed"


async def _load_test_statuses(cluster, tls: TlsConfig) -> dict[str, str]:
    """One request from the load-test harness over each backend, with the client certificate."""
    from pagedserve.loadtest.backends import Credentials, SamplingConfig, make_backend
    from pagedserve.loadtest.datasets import RequestSpec

    spec = RequestSpec(index=0, max_tokens=2, prompt_token_ids=(5, 9, 14))
    out = {}
    for name in ("grpc", "openai"):
        backend = make_backend(name, cluster.router_address, cluster.http_url or "",
                               SamplingConfig(), credentials=Credentials(tls=tls))
        try:
            out[name] = (await backend.generate(spec, 60, 0.0)).status
        finally:
            await backend.close()
    return out


def test_server_only_tls_needs_no_client_certificate(pki) -> None:
    """A certificate without a CA is plain TLS: a client that trusts the CA is served without a
    certificate of its own (no identity to check, so every caller gets in); plaintext is not."""
    model = tiny_llama_dir()
    cfg = cpu_worker_config(model, block_size=4)
    cfg = replace(cfg, server=replace(cfg.server, tls=replace(pki["worker"], ca_file=None)))

    async def run() -> tuple[tuple[grpc.StatusCode, ...], tuple[grpc.StatusCode, ...]]:
        started = await start_worker_server(cfg, cpu_worker(model, block_size=4))
        address = f"127.0.0.1:{started.port}"
        try:
            return (await _worker_calls(address, _ca_only(pki)),
                    await _worker_calls(address, None))
        finally:
            await started.stop()

    trusting, plaintext = asyncio.run(run())
    assert trusting[:2] == (grpc.StatusCode.OK, grpc.StatusCode.OK)
    assert plaintext == (grpc.StatusCode.UNAVAILABLE,) * 4
