"""The router's side of ``Scheduler``: one channel, the Submit stream, model info at start.

An upstream failure becomes ``UpstreamError`` carrying the scheduler's status code, so the
servicer's single error path (``pagedserve.grpc_util.abort_for``) passes it through unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from pagedserve.errors import PagedServeError
from pagedserve.grpc_util import CHANNEL_OPTIONS
from protos.pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc

logger = logging.getLogger(__name__)


class UpstreamError(PagedServeError):
    """The scheduler ended a call with ``code`` (a ``grpc.StatusCode`` name)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def upstream_error(exc: grpc.aio.AioRpcError) -> UpstreamError:
    return UpstreamError(exc.code().name, f"scheduler: {exc.details() or exc.code().name}")


class SubmitStream:
    """One ``Submit`` call. ``cancel`` is idempotent and safe after the call ended; cancelling
    aborts the request in the scheduler (frees its blocks)."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, request_id: str) -> None:
        self._call = call
        self._request_id = request_id

    async def __aiter__(self) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        try:
            async for response in self._call:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(exc) from exc

    def cancel(self) -> None:
        if self._call.cancel():
            logger.debug("request %s: cancelled upstream Submit", self._request_id)


class SchedulerClient:
    """Owns the channel to the scheduler. Calls are cancelled by closing their stream."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    async def model_info(self, timeout_s: float) -> scheduler_pb2.SchedulerModelInfo:
        """Waits up to ``timeout_s`` for the scheduler to be reachable, then asks what it serves."""
        try:
            return await self._stub.GetModelInfo(
                scheduler_pb2.SchedulerModelInfoRequest(), timeout=timeout_s, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(exc) from exc

    def submit(self, request: scheduler_pb2.SubmitRequest, timeout_s: float | None,
               wait_for_ready: bool = False) -> SubmitStream:
        """Starts ``Scheduler.Submit``; the caller iterates the stream and must ``cancel`` it.
        ``wait_for_ready`` waits (within the timeout) for a scheduler that is restarting."""
        call = self._stub.Submit(request, timeout=timeout_s, wait_for_ready=wait_for_ready)
        return SubmitStream(call, request.request_id)

    async def close(self) -> None:
        await self._channel.close()
