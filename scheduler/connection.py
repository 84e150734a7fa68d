"""``RouterConnection``: the scheduler's side of one router's ``Connect`` call.

A router sends every request it serves over one call. The step loop only marks the streams it
appended tokens to (``RequestStream.listener``); ``updates`` wakes once per step and packs every
marked stream's new tokens into ONE ``ConnectResponse``. So a step with 64 running requests costs
one gRPC message and one task wake-up here, not 64 of each.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from pagedserve.core.deadline import expire_after
from pagedserve.core.errors import InvalidArgument, PagedServeError
from pagedserve.core.grpc_util import status_code_for
from protos.pagedserve.v1 import scheduler_pb2
from scheduler.request_stream import RequestStream

Start = Callable[[scheduler_pb2.SubmitRequest], RequestStream]


def _status(exc: BaseException) -> tuple[int, str]:
    code: grpc.StatusCode = status_code_for(exc)
    return code.value[0], str(exc)


class RouterConnection:
    """The requests of one ``Connect`` call. ``handle`` takes the router's messages; ``updates``
    yields what to send; ``close`` aborts whatever is still running (the call ended)."""

    def __init__(self, start: Start, abort: Callable[[str], bool]) -> None:
        self._start, self._abort = start, abort
        self._streams: dict[str, RequestStream] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._ready: dict[str, RequestStream] = {}  # streams with something to send, in order
        self._ended: list[scheduler_pb2.RequestUpdate] = []  # refused or timed out: send as is
        self._waiter: asyncio.Future | None = None
        self._input_done = False
        self._draining = False  # shutting down; not yet told to the router

    def handle(self, message: scheduler_pb2.ConnectRequest) -> None:
        """Aborts first (a router never aborts a request it submits in the same message)."""
        for request_id in message.abort_request_ids:
            self._drop(request_id)
        for request in message.submits:
            self._submit(request)

    def input_done(self) -> None:
        """The router half-closed: finish what runs, then end the call."""
        self._input_done = True
        self._wake()

    def drain(self) -> None:
        """The scheduler is shutting down: tell the router to send new requests elsewhere."""
        self._draining = True
        self._wake()

    def close(self) -> None:
        for request_id in list(self._streams):
            self._drop(request_id)

    async def updates(self) -> AsyncIterator[scheduler_pb2.ConnectResponse]:
        while True:
            if not self._ready and not self._ended and not self._draining:
                if self._input_done and not self._streams:
                    return
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            response = scheduler_pb2.ConnectResponse(updates=self._ended, draining=self._draining)
            self._ended = []
            self._draining = False
            ready, self._ready = self._ready, {}
            for request_id, stream in ready.items():
                outputs, closed = stream.take()
                if not outputs and not closed:
                    continue
                update = response.updates.add(request_id=request_id, outputs=outputs,
                                              finished=closed)
                if closed:
                    self._forget(request_id)
                    if stream.error is not None:
                        update.status_code, update.status_message = _status(stream.error)
            if response.updates or response.draining:
                yield response

    # --- internal -----------------------------------------------------------------------------

    def _submit(self, request: scheduler_pb2.SubmitRequest) -> None:
        request_id = request.request_id
        try:
            if request_id in self._streams:
                raise InvalidArgument("request_id", f"{request_id!r} is already running")
            stream = self._start(request)
        except PagedServeError as exc:
            code, message = _status(exc)
            self._end(scheduler_pb2.RequestUpdate(
                request_id=request_id, finished=True, status_code=code, status_message=message))
            return
        self._streams[request_id] = stream
        stream.listener = self._on_ready
        timer = expire_after(request.timeout_s, lambda: self._expire(request_id))
        if timer is not None:
            self._timers[request_id] = timer
        if stream.has_data or stream.finished:
            self._on_ready(stream)

    def _on_ready(self, stream: RequestStream) -> None:
        if stream.request_id in self._streams:
            self._ready[stream.request_id] = stream
            self._wake()

    def _expire(self, request_id: str) -> None:
        self._timers.pop(request_id, None)
        if request_id in self._streams:
            self._drop(request_id)
            self._end(scheduler_pb2.RequestUpdate(
                request_id=request_id, finished=True,
                status_code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
                status_message="deadline exceeded in the scheduler"))

    def _drop(self, request_id: str) -> None:
        """Stops a request and sends nothing more for it (the router asked, or is gone)."""
        if self._forget(request_id):
            self._abort(request_id)  # frees its blocks

    def _forget(self, request_id: str) -> bool:
        stream = self._streams.pop(request_id, None)
        self._ready.pop(request_id, None)
        timer = self._timers.pop(request_id, None)
        if timer is not None:
            timer.cancel()
        if stream is not None:
            stream.listener = None
        return stream is not None

    def _end(self, update: scheduler_pb2.RequestUpdate) -> None:
        self._ended.append(update)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
