"""The one place where domain errors become gRPC status codes, plus server boilerplate and the
one home of transport security: TLS/mTLS credentials for every server and channel (and the
router's HTTP port), and the client-identity check that keeps internal APIs to their one caller.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagedserve.core import file_watch
from pagedserve.core.errors import PagedServeError, RateLimited, SequenceRefused
from pagedserve.core.file_watch import FileWatch

logger = logging.getLogger(__name__)
StubT = TypeVar("StubT")

# Metadata on every scheduler -> worker ``Step``: the worker process instance
# (``WorkerInfo.instance_id``) the step was planned for; a restarted worker refuses other
# instances' steps (scheduler/worker_handle.py, worker/servicer.py).
WORKER_INSTANCE_METADATA = "pagedserve-worker-instance"

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
# The scheduler's channel to each worker pings every WORKER_KEEPALIVE_MS and gives up after
# WORKER_KEEPALIVE_TIMEOUT_MS without an answer: a worker that hangs (a stopped process, a
# partitioned node: no connection reset to tell) fails its in-flight step within 2 s, not at the
# step timeout, and its requests move on. Workers accept pings that often.
WORKER_KEEPALIVE_MS = 500
WORKER_KEEPALIVE_TIMEOUT_MS = 1000


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES,
                    keepalive_ms: int = KEEPALIVE_TIME_MS,
                    keepalive_timeout_ms: int = KEEPALIVE_TIMEOUT_MS) -> list[tuple[str, int]]:
    """Options of every client channel."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
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
WORKER_CHANNEL_OPTIONS = [
    *channel_options(keepalive_ms=WORKER_KEEPALIVE_MS,
                     keepalive_timeout_ms=WORKER_KEEPALIVE_TIMEOUT_MS),
    # Recent gRPC cores time a ping's ack by this (default 60 s), not by the keepalive timeout.
    ("grpc.http2.ping_timeout_ms", WORKER_KEEPALIVE_TIMEOUT_MS),
]
WORKER_SERVER_OPTIONS = server_options(keepalive_ms=WORKER_KEEPALIVE_MS)


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, PagedServeError):
        return getattr(grpc.StatusCode, exc.code)
    return grpc.StatusCode.INTERNAL


def retry_after(exc: BaseException) -> str | None:
    """The ``retry-after`` value (whole seconds, at least 1) for a rate-limit refusal."""
    if not isinstance(exc, RateLimited):
        return None
    return str(max(1, math.ceil(exc.retry_after_s)))


# Trailing metadata of a refused ``Worker.Step``: the sequence at fault (``SequenceRefused``).
SEQ_ID_METADATA_KEY = "pagedserve-seq-id"


async def abort_for(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the call with the status ``exc`` maps to. Trailing metadata: ``retry-after`` for a
    rate-limit refusal, the refused sequence's id for ``SequenceRefused``. Never returns (grpc
    raises)."""
    trailing: tuple[tuple[str, str], ...] = ()
    hint = retry_after(exc)
    if hint is not None:
        trailing += (("retry-after", hint),)
    if isinstance(exc, SequenceRefused):
        trailing += ((SEQ_ID_METADATA_KEY, str(exc.seq_id)),)
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


# --- TLS -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsConfig:
    """One service's certificate files (PEM), used on both sides of its connections.

    As a server: ``cert_file``/``key_file`` turn TLS on; ``ca_file`` as well makes it mutual (a
    client without a certificate signed by that CA fails the handshake). As a client (router ->
    scheduler, scheduler -> worker, CLI, load test): ``ca_file`` verifies the server and
    ``cert_file``/``key_file`` present this side's certificate. ``server_name`` (clients only)
    is the name the server's certificate must carry when the address does not (pod IPs found by
    discovery). Nothing set = plaintext, as before."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("--tls-cert-file and --tls-key-file go together: give both or none")

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None or self.ca_file is not None

    @property
    def mutual(self) -> bool:
        """As a server: client certificates are required."""
        return self.ca_file is not None

    def check_server(self) -> None:
        """Raises ``ValueError`` unless this can secure a server's port (a service's config
        calls it at start, before anything slow)."""
        if self.ca_file is not None and self.cert_file is None:
            raise ValueError("a TLS server needs --tls-cert-file and --tls-key-file "
                             "(--tls-ca-file alone only verifies servers)")


def add_tls_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, env_prefix: str,
                      server: bool = True) -> None:
    """``--tls-cert-file``, ``--tls-key-file``, ``--tls-ca-file`` (each also read from
    ``<env_prefix>TLS_CERT_FILE`` ...); ``server`` False adds ``--tls-server-name`` instead of
    the server wording."""
    env = os.environ.get
    role = "this service's" if server else "the client's"
    parser.add_argument("--tls-cert-file", default=env(env_prefix + "TLS_CERT_FILE") or None,
                        help=f"{role} certificate chain (PEM); with --tls-key-file turns TLS on")
    parser.add_argument("--tls-key-file", default=env(env_prefix + "TLS_KEY_FILE") or None,
                        help=f"{role} private key (PEM)")
    parser.add_argument("--tls-ca-file", default=env(env_prefix + "TLS_CA_FILE") or None,
                        help="CA bundle (PEM) that peers' certificates must chain to"
                             + ("; on a server this requires client certificates (mTLS)"
                                if server else ""))
    if not server:
        parser.add_argument("--tls-server-name", default=env(env_prefix + "TLS_SERVER_NAME")
                            or None, help="name the server's certificate must carry "
                                          "(default: the address's host)")


def tls_config_from_args(args: argparse.Namespace) -> TlsConfig:
    return TlsConfig(args.tls_cert_file, args.tls_key_file, args.tls_ca_file,
                     getattr(args, "tls_server_name", None))


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


class CertificateFiles:
    """A ``TlsConfig``'s files as last read, re-read when they change on disk
    (``pagedserve.core.file_watch``), so certificates rotate without a restart (cert-manager
    renewing a Kubernetes secret swaps the mounted files).

    On a change ``refresh`` reads the set and checks it (the certificate chain parses, the key
    is the first certificate's, the CA bundle parses) before taking it. A set that does not
    check (a file half written or missing, a key from another pair) is logged, once, and
    skipped; the last good one stays. Thread-safe: gRPC asks from its own threads."""

    def __init__(self, tls: TlsConfig) -> None:
        self.tls = tls
        self._watch = FileWatch([p for p in (tls.cert_file, tls.key_file, tls.ca_file)
                                 if p is not None])
        self._lock = threading.Lock()
        self.cert, self.key, self.ca = self._load()  # bad files at start are the caller's error

    def refresh(self) -> bool:
        """True when a changed, valid set was read since the last call."""
        with self._lock:
            if not self._watch.changed():
                return False
            paths = ", ".join(self._watch.paths)
            try:
                self.cert, self.key, self.ca = self._load()
            except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
                logger.warning("TLS files %s changed but do not load (%s); keeping the "
                               "certificates read before", paths, exc)
                return False
            logger.info("TLS files changed; new connections use them: %s", paths)
            return True

    def server_configuration(self) -> grpc.ServerCertificateConfiguration:
        assert self.key is not None and self.cert is not None
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)],
                                                         root_certificates=self.ca)

    def _load(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        cert, key, ca = (_read(self.tls.cert_file), _read(self.tls.key_file),
                         _read(self.tls.ca_file))
        if ca is not None:
            x509.load_pem_x509_certificates(ca)
        if cert is not None and key is not None:
            public = x509.load_pem_x509_certificates(cert)[0].public_key()
            if _public_bytes(serialization.load_pem_private_key(key, None).public_key()) \
                    != _public_bytes(public):
                raise ValueError(f"{self.tls.key_file} is not the key of {self.tls.cert_file}")
        return cert, key, ca


def _public_bytes(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS server credentials; client certificates required when ``tls.ca_file`` is set. The
    files are looked at again on new connections (``CertificateFiles``): a rotated certificate
    or CA bundle is presented and trusted from the next handshake on."""
    tls.check_server()
    files = CertificateFiles(tls)

    def fetch() -> grpc.ServerCertificateConfiguration | None:  # gRPC asks at each handshake
        return files.server_configuration() if files.refresh() else None

    return grpc.dynamic_ssl_server_credentials(files.server_configuration(), fetch,
                                               require_client_authentication=tls.mutual)


def add_port(server: grpc.aio.Server, address: str, tls: TlsConfig) -> int:
    """Binds ``address`` (TLS when ``tls`` has a certificate); the bound port."""
    if tls.cert_file is None and tls.ca_file is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """Verifies the server against ``tls.ca_file`` (the system roots when unset) and presents
    ``tls.cert_file`` when set."""
    return grpc.ssl_channel_credentials(root_certificates=_read(tls.ca_file),
                                        private_key=_read(tls.key_file),
                                        certificate_chain=_read(tls.cert_file))


def _channel_options(tls: TlsConfig) -> list[tuple[str, Any]]:
    if tls.server_name:
        return [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", tls.server_name)]
    return list(CHANNEL_OPTIONS)


def aio_channel(address: str, tls: TlsConfig | None = None,
                extra_options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """The one way services and clients open a channel: plaintext unless ``tls`` is enabled.
    ``extra_options`` replace shared ones of the same name or add to them (e.g. the worker
    channel's keepalive, a shorter reconnect backoff)."""
    if tls is None or not tls.enabled:
        return grpc.aio.insecure_channel(address,
                                         options=_override(CHANNEL_OPTIONS, extra_options))
    return grpc.aio.secure_channel(address, channel_credentials(tls),
                                   options=_override(_channel_options(tls), extra_options))


def _override(base: Sequence[tuple[str, Any]], extra: Sequence[tuple[str, Any]]
              ) -> list[tuple[str, Any]]:
    return list({**dict(base), **dict(extra)}.items())


# A channel replaced after a certificate rotation closes once its calls have ended, or after
# this long (then they are cancelled).
RETIRED_CHANNEL_GRACE_S = 3600.0


class ServiceChannel(Generic[StubT]):
    """A service's long-lived channel to another service (router -> scheduler, scheduler ->
    worker) that follows its own TLS files: after they change (``CertificateFiles``),
    ``stub()`` answers on a new channel that presents the rotated certificate and trusts the
    rotated CA bundle, and the old channel closes when its calls end. Calls already running
    keep their connection. Plaintext: one channel for good."""

    def __init__(self, address: str, tls: TlsConfig | None, stub: Callable[[Any], StubT],
                 extra_options: Sequence[tuple[str, Any]] = ()) -> None:
        self.address = address
        self._tls = tls
        self._extra_options = extra_options
        self._files = CertificateFiles(tls) if tls is not None and tls.enabled else None
        self._new_stub = stub
        self.channel = self._open()
        self._stub = stub(self.channel)
        self._retired: dict[grpc.aio.Channel, asyncio.Task[None]] = {}

    def stub(self) -> StubT:
        """The stub on the current channel (from an event loop: a replaced channel is closed
        by a task on it)."""
        if self._files is not None and self._files.refresh():
            old, self.channel = self.channel, self._open()
            self._stub = self._new_stub(self.channel)
            self._retired[old] = task = asyncio.get_running_loop().create_task(
                old.close(grace=RETIRED_CHANNEL_GRACE_S))
            task.add_done_callback(lambda _: self._retired.pop(old, None))
        return self._stub

    async def close(self) -> None:
        retired = list(self._retired.items())
        for _, task in retired:
            task.cancel()
        await asyncio.gather(*(task for _, task in retired), return_exceptions=True)
        for channel in [*(channel for channel, _ in retired), self.channel]:
            await channel.close()

    def _open(self) -> grpc.aio.Channel:
        # aio_channel reads the files the refresh has just checked (changed again since then,
        # the next refresh sees it and opens another)
        return aio_channel(self.address, self._tls, self._extra_options)


def sync_channel(address: str, tls: TlsConfig | None = None) -> grpc.Channel:
    """``aio_channel`` for blocking code (``pagedserve up``'s health checks)."""
    if tls is None or not tls.enabled:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, channel_credentials(tls), options=_channel_options(tls))


class ServerSslContext:
    """The same files for an HTTP server (the router's OpenAI API), kept current: ``watch``
    (run it as a task) loads a rotated certificate and key into ``context`` for the next
    handshakes, and adds a rotated CA bundle's certificates to those client certificates are
    checked against (OpenSSL cannot drop a CA from a live context: one removed from the bundle
    stays trusted on the HTTP port until a restart; gRPC ports drop it)."""

    def __init__(self, tls: TlsConfig) -> None:
        assert tls.cert_file is not None and tls.key_file is not None
        self.files = CertificateFiles(tls)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._load()
        if tls.ca_file is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(max(file_watch.CHECK_INTERVAL_S, 0.1))
            if self.files.refresh():
                try:
                    self._load()
                except (OSError, ssl.SSLError) as exc:  # changed again since it was checked
                    logger.warning("HTTPS certificate reload failed (%s); retrying on the "
                                   "next change", exc)

    def _load(self) -> None:
        tls = self.files.tls
        assert tls.cert_file is not None
        self.context.load_cert_chain(tls.cert_file, tls.key_file)
        if self.files.ca is not None:
            self.context.load_verify_locations(cadata=self.files.ca.decode())


def server_ssl_context(tls: TlsConfig) -> ServerSslContext | None:
    """The router's HTTPS context over ``tls`` (None when TLS is off)."""
    if tls.cert_file is None or tls.key_file is None:
        return None
    return ServerSslContext(tls)


def client_ssl_context(tls: TlsConfig | None) -> ssl.SSLContext | None:
    """The same files for an HTTP client (the load test's OpenAI backend); None when off."""
    if tls is None or not tls.enabled:
        return None
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


# --- caller identity (mTLS) ----------------------------------------------------------------------


def peer_names(context: grpc.aio.ServicerContext) -> set[str]:
    """The names in the caller's verified client certificate: common name and subject
    alternative names (empty without mTLS)."""
    auth = context.auth_context() or {}
    values = [*auth.get("x509_common_name", []), *auth.get("x509_subject_alternative_name", [])]
    return {v.decode() if isinstance(v, bytes) else str(v) for v in values}


class ClientIdentityInterceptor(grpc.aio.ServerInterceptor):
    """Lets only callers whose client certificate names one of ``identities`` (CN or SAN) into
    ``service`` (a full service name); other callers get PERMISSION_DENIED. Health and
    reflection stay open to every caller that passed the handshake (probes).

    The check runs in the handler (the interceptor's call details carry no certificate), so it
    wraps the service's handlers (unary-request methods and bidirectional streams)."""

    def __init__(self, service: str, identities: Sequence[str]) -> None:
        self._prefix = f"/{service}/"
        self._identities = frozenset(identities)

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        return self._guarded(handler, details.method)

    async def _check(self, context: grpc.aio.ServicerContext, method: str) -> None:
        names = peer_names(context)
        if names & self._identities:
            return
        logger.warning("%s refused: caller %s (certificate names %s) is not one of %s", method,
                       context.peer(), sorted(names) or "none", sorted(self._identities))
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"{method} is only for {', '.join(sorted(self._identities))}")

    def _guarded(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        serializers = {"request_deserializer": handler.request_deserializer,
                       "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await self._check(context, method)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **serializers)
        inner_stream = handler.unary_stream or handler.stream_stream
        if inner_stream is None:
            raise ValueError(f"{method}: client-streaming methods are not guarded")

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._check(context, method)  # request: a message, or the request iterator
            async for response in inner_stream(request, context):
                yield response

        make = (grpc.unary_stream_rpc_method_handler if handler.unary_stream is not None
                else grpc.stream_stream_rpc_method_handler)
        return make(stream, **serializers)


def add_client_identity_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                                 env_prefix: str,
                                 default: str, service: str) -> None:
    """``--tls-client-identity NAME`` (repeatable; env ``<env_prefix>TLS_CLIENT_IDENTITY``,
    comma-separated): with mTLS, only a client certificate naming one of them may call
    ``service``."""
    raw = os.environ.get(env_prefix + "TLS_CLIENT_IDENTITY")
    parser.add_argument(
        "--tls-client-identity", action="append", dest="tls_client_identities", default=None,
        help=f"with --tls-ca-file, only a client certificate with this CN or SAN may call "
             f"{service} (repeatable; '' = any valid certificate; default {default!r})")
    parser.set_defaults(_tls_client_identity_default=(
        tuple(n for n in raw.split(",")) if raw is not None else (default,)))


def client_identities_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    names = args.tls_client_identities
    chosen = tuple(names) if names is not None else args._tls_client_identity_default
    return tuple(n.strip() for n in chosen if n.strip())


def identity_interceptors(tls: TlsConfig, service: str,
                          identities: Sequence[str]) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a server installs: the identity check when TLS is mutual and
    ``identities`` names someone, else none (no client certificates to check)."""
    if not tls.mutual or not identities:
        return []
    return [ClientIdentityInterceptor(service, identities)]
