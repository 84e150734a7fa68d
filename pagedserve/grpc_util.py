"""The one place where domain errors become gRPC status codes, plus server boilerplate."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagedserve.errors import PagedServeError, SequenceRefused

# Internal calls carry whole prompts (a step registers new sequences with all their tokens), so
# their limit is generous but deliberate; the router's public port takes its own, smaller limit
# (``router/config.py``: ``--max-prompt-bytes``).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Keepalive, for clients and servers from one place: a client pings an open call every
# KEEPALIVE_TIME_MS, even when idle (an idle router->scheduler Connect call must survive, and a
# dead peer must be noticed), and every server accepts pings that often. Servers that
# accepted fewer pings than clients send answered with GOAWAY ``too_many_pings``.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES,
                    keepalive_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, int]]:
    """Options of every client channel."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle call
    ]


def server_options(max_receive_bytes: int = MAX_MESSAGE_BYTES,
                   keepalive_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, int]]:
    """Options of every server: message limits, and a ping policy that accepts what
    ``channel_options`` sends (half its interval, for timer slack). A message over
    ``max_receive_bytes`` is refused by gRPC with RESOURCE_EXHAUSTED before it is parsed."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", keepalive_ms // 2),
    ]


CHANNEL_OPTIONS = channel_options()
SERVER_OPTIONS = server_options()


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


def add_servicer_parsing_requests(server: grpc.aio.Server, servicer: object,
                                  service: ServiceDescriptor) -> None:
    """Registers ``servicer``'s methods of ``service`` as the generated ``add_*_to_server``
    does, but parses each request itself: a message protobuf cannot decode (invalid UTF-8 in a
    string field, a truncated field) ends INVALID_ARGUMENT naming the message, where gRPC's own
    parsing ends it UNKNOWN. Unary requests only (the public API has no client streaming)."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client streaming is not supported here")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        behavior = getattr(servicer, method.name)
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make(
            _streaming(behavior, request_cls) if method.server_streaming
            else _unary(behavior, request_cls),
            response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))


async def _parse(request_cls: Any, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
    try:
        return request_cls.FromString(raw)
    except DecodeError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"request: not a valid {request_cls.DESCRIPTOR.name}: {exc}")


def _unary(behavior: Callable[..., Awaitable[Any]], request_cls: Any
           ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(await _parse(request_cls, raw, context), context)
    return handle


def _streaming(behavior: Callable[..., AsyncIterator[Any]], request_cls: Any
               ) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in behavior(await _parse(request_cls, raw, context), context):
            yield response
    return handle


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
