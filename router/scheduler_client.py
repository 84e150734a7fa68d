"""The router's side of ``Scheduler``: one channel, one ``Connect`` call carrying every request,
model info at start.

``SchedulerClient.submit`` puts a request on the shared call and returns its ``SubmitStream``; a
reader task hands each ``RequestUpdate`` of the scheduler's per-step messages to its stream. An
upstream failure becomes ``UpstreamError`` carrying the scheduler's status code, so the
servicer's single error path (``pagedserve.core.grpc_util.abort_for``) passes it through
unchanged. When the call breaks (scheduler restart, failover), every stream on it ends
``UNAVAILABLE`` and the next submit opens a new call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from pagedserve.core.deadline import expire_after
from pagedserve.core.errors import InvalidArgument, PagedServeError
from pagedserve.core.grpc_util import ServiceChannel, TlsConfig
from protos.pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc

logger = logging.getLogger(__name__)

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class UpstreamError(PagedServeError):
    """The scheduler ended a call with ``code`` (a ``grpc.StatusCode`` name)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def upstream_error(exc: grpc.aio.AioRpcError) -> UpstreamError:
    return UpstreamError(exc.code().name, f"scheduler: {exc.details() or exc.code().name}")


class SubmitStream:
    """One request on the shared call: its updates in order, until the finished one. ``cancel`` is
    idempotent and safe after the end; cancelling aborts the request in the scheduler (frees its
    blocks). ``timeout_s`` is enforced here as well as in the scheduler, so a request waiting for
    an unreachable scheduler still ends ``DEADLINE_EXCEEDED`` on time."""

    def __init__(self, link: _Link, request_id: str, timeout_s: float | None) -> None:
        self.request_id = request_id
        self._link = link
        self._items: asyncio.Queue[scheduler_pb2.RequestUpdate | UpstreamError] = asyncio.Queue()
        self._ended = False  # nothing more will be delivered
        self._timer = expire_after(timeout_s, self._expire)

    async def __aiter__(self) -> AsyncIterator[scheduler_pb2.RequestUpdate]:
        while True:
            item = await self._items.get()
            if isinstance(item, UpstreamError):
                raise item
            if item.status_code:
                raise UpstreamError(_CODE_NAMES.get(item.status_code, "UNKNOWN"),
                                    f"scheduler: {item.status_message}")
            yield item
            if item.finished:
                return

    def cancel(self) -> None:
        if not self._ended:
            self._end()
            self._link.abort(self.request_id)
            logger.debug("request %s: aborted upstream", self.request_id)

    def deliver(self, item: scheduler_pb2.RequestUpdate | UpstreamError) -> None:
        """From the reader: an update, or the error that ends the stream."""
        if isinstance(item, UpstreamError) or item.finished:
            self._end()
        self._items.put_nowait(item)

    def _end(self) -> None:
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
        self._link.streams.pop(self.request_id, None)

    def _expire(self) -> None:
        self._timer = None
        if not self._ended:
            self.cancel()
            self.deliver(UpstreamError("DEADLINE_EXCEEDED", "scheduler: deadline exceeded"))


class _Link:
    """One ``Connect`` call: what to send and the streams that wait on it. Submits and aborts
    queue here; each message carries all that queued while the previous one was being sent.
    ``broken`` once the call ended: nothing more is sent on it. ``draining`` once the scheduler
    said it is shutting down: its requests finish here, new ones go on a new call."""

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        self.streams: dict[str, SubmitStream] = {}
        self.broken = False
        self.draining = False
        self._submits: dict[str, scheduler_pb2.SubmitRequest] = {}  # not sent yet
        self._aborts: list[str] = []
        self._pending = asyncio.Event()
        self._call = stub.Connect(self._requests(), wait_for_ready=True)
        self._reader = asyncio.create_task(self._read())

    def submit(self, request: scheduler_pb2.SubmitRequest) -> None:
        if not self.broken:
            self._submits[request.request_id] = request
            self._pending.set()

    def abort(self, request_id: str) -> None:
        if self._submits.pop(request_id, None) is None and not self.broken:
            self._aborts.append(request_id)
            self._pending.set()

    async def close(self) -> None:
        self.broken = True
        self._pending.set()
        self._call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _requests(self) -> AsyncIterator[scheduler_pb2.ConnectRequest]:
        while True:
            await self._pending.wait()
            self._pending.clear()
            if self.broken:
                return
            if not self._aborts and not self._submits:
                continue
            message = scheduler_pb2.ConnectRequest(abort_request_ids=self._aborts,
                                                   submits=self._submits.values())
            self._aborts, self._submits = [], {}
            yield message

    async def _read(self) -> None:
        error = UpstreamError("UNAVAILABLE", "scheduler: connection closed")
        try:
            async for response in self._call:
                if response.draining and not self.draining:
                    self.draining = True
                    logger.info("scheduler is shutting down: new requests go on a new call")
                for update in response.updates:
                    stream = self.streams.get(update.request_id)
                    if stream is not None:  # else: cancelled here already
                        stream.deliver(update)
        except grpc.aio.AioRpcError as exc:
            error = upstream_error(exc)
            if exc.code() == grpc.StatusCode.CANCELLED:
                error = UpstreamError("UNAVAILABLE", "scheduler: connection cancelled")
        finally:
            self.broken = True
            self._pending.set()
            for stream in list(self.streams.values()):
                stream.deliver(error)
            if self.streams:
                logger.warning("scheduler connection ended: %s", error)


class SchedulerClient:
    """Owns the channel to the scheduler and the current ``Connect`` call. ``tls``: the
    router's certificate and the CA that verifies the scheduler (None = plaintext); a rotated
    certificate is taken up when the next call opens (``ServiceChannel``)."""

    def __init__(self, address: str, tls: TlsConfig | None = None) -> None:
        self.address = address
        self._channel = ServiceChannel(address, tls, scheduler_pb2_grpc.SchedulerStub)
        self._link: _Link | None = None

    async def model_info(self, timeout_s: float) -> scheduler_pb2.SchedulerModelInfo:
        """Waits up to ``timeout_s`` for the scheduler to be reachable, then asks what it serves."""
        try:
            return await self._channel.stub().GetModelInfo(
                scheduler_pb2.SchedulerModelInfoRequest(), timeout=timeout_s, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(exc) from exc

    def submit(self, request: scheduler_pb2.SubmitRequest) -> SubmitStream:
        """Sends ``request`` on the shared call (opened, or reopened after a failure, here; it
        waits for a scheduler that is restarting). ``request.timeout_s`` (0 = none) bounds it.
        The caller iterates the stream and must ``cancel`` it."""
        link = self._link
        if link is None or link.broken or link.draining:
            link = self._link = _Link(self._channel.stub())
        if request.request_id in link.streams:
            raise InvalidArgument("request_id", f"{request.request_id!r} is already running")
        stream = SubmitStream(link, request.request_id, request.timeout_s)
        link.streams[request.request_id] = stream
        link.submit(request)
        return stream

    async def close(self) -> None:
        if self._link is not None:
            await self._link.close()
        await self._channel.close()
