"""Certificates rotate without a restart: a service whose certificate, key or CA bundle is
replaced on disk (as cert-manager renews a mounted Kubernetes secret) presents and trusts the new
ones from the next handshake on, on its gRPC port and its HTTPS port, and its long-lived channels
to other services (router -> scheduler, scheduler -> worker) connect with them from then on. A
replacement that does not load keeps the old certificates. Real servers, real certificates from
``pagedserve.certs``; the files are swapped by rename, as the kubelet swaps a secret's files."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.certs import ROLES, LocalCA, identity, write_local_pki
from pagedserve.client import AsyncClient
from pagedserve.cluster import start_local_cluster
from pagedserve.core import file_watch, grpc_util
from pagedserve.core.grpc_util import TlsConfig, aio_channel
from protos.pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from router.scheduler_client import SchedulerClient
from scheduler.config import SchedulerConfig
from scheduler.config import ServerConfig as SchedulerServerConfig
from scheduler.server import build_server as build_scheduler
from scheduler.worker_handle import GrpcWorkerHandle, InProcessWorkerHandle
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.tls_calls import https_models, status_code
from tests.support.worker_factory import cpu_worker, cpu_worker_config
from worker.server import start_worker_server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def look_at_every_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    """Services look at their files at most once a second; here, at every handshake (the
    router's HTTPS port, which has no handshake hook, every 0.1 s)."""
    monkeypatch.setattr(file_watch, "CHECK_INTERVAL_S", 0.0)


def _swap(path: str | None, data: bytes) -> None:
    assert path is not None
    staged = f"{path}.new"
    Path(staged).write_bytes(data)
    os.replace(staged, path)


def _rotate(pki: dict[str, TlsConfig], ca: LocalCA) -> None:
    """Every role's certificate and key issued by ``ca``, which replaces the CA bundle."""
    for role in ROLES:
        issued = ca.issue(identity(role), ("localhost", "127.0.0.1"))
        _swap(pki[role].key_file, issued.key_pem)
        _swap(pki[role].cert_file, issued.cert_pem)
    _swap(pki["client"].ca_file, ca.cert_pem)


def _snapshot(tls: TlsConfig, directory: Path) -> TlsConfig:
    """A copy of ``tls``'s files: a peer that keeps the certificates from before a rotation."""
    directory.mkdir()
    paths = [shutil.copy(p, directory / Path(p).name)
             for p in (tls.cert_file, tls.key_file, tls.ca_file) if p is not None]
    return TlsConfig(*map(str, paths))


async def _health(address: str, tls: TlsConfig) -> grpc.StatusCode:
    """A new channel's health check: a fresh handshake with ``tls``."""
    async with aio_channel(address, tls) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_a_running_mtls_cluster_serves_rotated_certificates_on_new_connections(
        tmp_path: Path) -> None:
    pki = write_local_pki(tmp_path / "pki")
    before = _snapshot(pki["client"], tmp_path / "before")
    model = tiny_llama_dir()

    async def run() -> dict[str, object]:
        cluster = await start_local_cluster([cpu_worker_config(model, block_size=4)],
                                            http=True, tls=pki)
        out: dict[str, object] = {}
        try:
            async with AsyncClient(cluster.router_address, tls=pki["client"]) as client:
                out["text before"] = await client.generate_text(
                    "hello", max_tokens=4, ignore_eos=True, temperature=0.0, timeout=60)
            _rotate(pki, LocalCA("the next CA"))
            async with AsyncClient(cluster.router_address, tls=pki["client"]) as client:
                out["text after"] = await client.generate_text(
                    "hello", max_tokens=4, ignore_eos=True, temperature=0.0, timeout=60)
            async with AsyncClient(cluster.router_address, tls=before) as client:
                out["old client"] = await status_code(client.model_info(timeout=10))
            out["https"] = await _https_after_its_watch(cluster.http_url, pki["client"])
            out["https old client"] = await https_models(cluster.http_url, before)
            async with aio_channel(cluster.scheduler_address, pki["router"]) as channel:
                out["scheduler"] = await status_code(scheduler_pb2_grpc.SchedulerStub(channel)
                                               .GetStats(scheduler_pb2.StatsRequest(), timeout=10))
            out["worker"] = await _health(f"127.0.0.1:{cluster.workers[0].port}",
                                          pki["scheduler"])
            out["worker old client"] = await _health(f"127.0.0.1:{cluster.workers[0].port}",
                                                     before)
        finally:
            await cluster.stop()
        return out

    out = asyncio.run(run())
    assert out["text before"] == out["text after"]
    assert out["scheduler"] == out["worker"] == grpc.StatusCode.OK
    # The old client trusts only the old CA: every server now presents the new CA's certificate.
    assert out["old client"] == out["worker old client"] == grpc.StatusCode.UNAVAILABLE
    assert out["https"] == 200
    assert out["https old client"] == "handshake failed"


async def _https_after_its_watch(http_url: str | None, tls: TlsConfig) -> int | str:
    """The HTTPS port looks at its files every 0.1 s here, from a task on the cluster's busy
    event loop: ask until it answers (a bound for the test, not a latency claim)."""
    for _ in range(100):
        status = await https_models(http_url, tls)
        if status == 200:
            break
        await asyncio.sleep(0.1)
    return status


def test_a_replacement_that_does_not_load_keeps_the_old_certificate(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pki = write_local_pki(tmp_path / "pki")
    model = tiny_llama_dir()
    cfg = cpu_worker_config(model, block_size=4)
    cfg = replace(cfg, server=replace(cfg.server, tls=pki["worker"]))
    next_ca = LocalCA("the next CA")

    async def run() -> list[grpc.StatusCode]:
        started = await start_worker_server(cfg, cpu_worker(model, block_size=4))
        address = f"127.0.0.1:{started.port}"
        try:
            codes = [await _health(address, pki["scheduler"])]
            # A certificate with another pair's key (a rotation caught half way).
            _swap(pki["worker"].cert_file,
                  next_ca.issue(identity("worker"), ("127.0.0.1",)).cert_pem)
            codes.append(await _health(address, pki["scheduler"]))
            _rotate(pki, next_ca)  # now whole
            codes.append(await _health(address, pki["scheduler"]))
            return codes
        finally:
            await started.stop()

    with caplog.at_level(logging.WARNING, logger=grpc_util.__name__):
        codes = asyncio.run(run())
    ok = grpc.StatusCode.OK
    # The scheduler's files rotate with the worker's in the last step, so each check is made by
    # a client that trusts the CA of the certificate the worker should present then.
    assert codes == [ok, ok, ok]
    assert any("do not load" in r.getMessage() and "is not the key of" in r.getMessage()
               for r in caplog.records)


def test_the_schedulers_worker_channel_reconnects_with_rotated_certificates(
        tmp_path: Path) -> None:
    """The worker restarts after the rotation (on the same port), trusting only the new CA: the
    scheduler's handle, created before, must connect with its new certificate."""
    pki = write_local_pki(tmp_path / "pki")
    model = tiny_llama_dir()
    cfg = cpu_worker_config(model, block_size=4)
    cfg = replace(cfg, server=replace(cfg.server, tls=pki["worker"]))

    async def run() -> tuple[str, str]:
        first = await start_worker_server(cfg, cpu_worker(model, block_size=4))
        handle = GrpcWorkerHandle(f"127.0.0.1:{first.port}", tls=pki["scheduler"])
        try:
            before = (await handle.info()).instance_id
            _rotate(pki, LocalCA("the next CA"))
            await first.stop()
            again = replace(cfg, server=replace(cfg.server, port=first.port))
            second = await start_worker_server(again, cpu_worker(model, block_size=4))
            try:
                return before, (await handle.info()).instance_id
            finally:
                await second.stop()
        finally:
            await handle.close()

    before, after = asyncio.run(run())
    assert before and after and before != after  # the restarted worker answered


def test_the_routers_scheduler_channel_reconnects_with_rotated_certificates(
        tmp_path: Path) -> None:
    """The scheduler restarts after the rotation (same port), trusting only the new CA: the
    router's client, created before, must connect with its new certificate."""
    pki = write_local_pki(tmp_path / "pki")
    worker = cpu_worker(tiny_llama_dir(), block_size=4)

    async def start(port: int):  # type: ignore[no-untyped-def]
        config = SchedulerConfig(server=SchedulerServerConfig(port=port, tls=pki["scheduler"]))
        return await build_scheduler(config, [InProcessWorkerHandle(worker)])

    async def run() -> tuple[str, str]:
        first = await start(0)
        client = SchedulerClient(f"127.0.0.1:{first.port}", tls=pki["router"])
        try:
            before = (await client.model_info(timeout_s=10)).model
            _rotate(pki, LocalCA("the next CA"))
            await first.stop(grace=0)
            second = await start(first.port)
            try:
                return before, (await client.model_info(timeout_s=10)).model
            finally:
                await second.stop(grace=0)
        finally:
            await client.close()

    before, after = asyncio.run(run())
    assert before and before == after
