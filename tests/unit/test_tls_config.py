"""TLS settings of the services (``pagedserve.core.grpc_util.TlsConfig``) are checked when the
config is built, before anything slow starts, and the identity flag reads CLI > env > default."""

from __future__ import annotations

import argparse

import pytest

from pagedserve.core.grpc_util import TlsConfig
from router.config import ServerConfig as RouterServerConfig
from scheduler.config import ServerConfig as SchedulerServerConfig
from worker.config import ServerConfig as WorkerServerConfig
from worker.config import add_worker_arguments, worker_config_from_args


def test_certificate_and_key_go_together() -> None:
    with pytest.raises(ValueError, match="go together"):
        TlsConfig(cert_file="c.pem")


@pytest.mark.parametrize("server", [RouterServerConfig, SchedulerServerConfig,
                                    WorkerServerConfig])
def test_a_server_with_a_ca_but_no_certificate_is_refused_at_config_time(server) -> None:
    with pytest.raises(ValueError, match="needs --tls-cert-file"):
        server(tls=TlsConfig(ca_file="ca.pem"))
    assert server(tls=TlsConfig("c.pem", "k.pem", "ca.pem")).tls.mutual


def _worker_identities(argv: list[str]) -> tuple[str, ...]:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    return worker_config_from_args(parser.parse_args(argv)).server.client_identities


def test_client_identity_flag_then_env_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _worker_identities([]) == ("pagedserve-scheduler",)
    monkeypatch.setenv("PAGEDSERVE_WORKER_TLS_CLIENT_IDENTITY", "sched-a, sched-b")
    assert _worker_identities([]) == ("sched-a", "sched-b")
    assert _worker_identities(["--tls-client-identity", "x", "--tls-client-identity", "y"]) == (
        "x", "y")
    assert _worker_identities(["--tls-client-identity", ""]) == ()  # any valid certificate
