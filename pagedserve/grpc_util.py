"""The one place where domain errors become gRPC status codes, plus server boilerplate."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagedserve.errors import PagedServeError, SequenceRefused

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, PagedServeError):
        return getattr(grpc.StatusCode, exc.code)
    return grpc.StatusCode.INTERNAL


# Trailing metadata of a refused ``Worker.Step``: the sequence at fault (``SequenceRefused``).
SEQ_ID_METADATA_KEY = "pagedserve-seq-id"


async def abort_for(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the call with the status ``exc`` maps to. Never returns (grpc raises)."""
    trailing: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, SequenceRefused):
        trailing = ((SEQ_ID_METADATA_KEY, str(exc.seq_id)),)
    await context.abort(status_code_for(exc), str(exc), trailing_metadata=trailing)


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: list[str]
) -> health.aio.HealthServicer:
    """Registers grpc.health.v1 (every service SERVING) and server reflection."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )
    return health_servicer


async def set_serving(
    health_servicer: health.aio.HealthServicer, names: list[str], ok: bool
) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *names]:
        await health_servicer.set(name, status)
