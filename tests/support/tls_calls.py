"""Calls that report how a secured service answered a caller, for the TLS tests: a gRPC call's
status code, an HTTPS request's status or a failed handshake."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable

import aiohttp
import grpc

from pagedserve.core.grpc_util import TlsConfig, client_ssl_context


async def status_code(call: Awaitable[object]) -> grpc.StatusCode:
    """``call``'s status: OK, or the code it failed with."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def https_models(http_url: str | None, tls: TlsConfig) -> int | str:
    """``GET /v1/models`` as a client with ``tls``: the HTTP status, or "handshake failed"."""
    assert http_url is not None and http_url.startswith("https://")
    context = client_ssl_context(tls)
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"{http_url}/v1/models", ssl=context) as resp:  # type: ignore[arg-type]
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError):
        return "handshake failed"
