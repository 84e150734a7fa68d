"""Thin adapter: the Scheduler gRPC service over ``Engine``. Errors map to codes in one place."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from pagedserve.core.errors import PagedServeError
from pagedserve.core.grpc_util import abort_for
from pagedserve.core.sampling import resolve_sampling_params
from protos.pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler.connection import RouterConnection
from scheduler.engine import Engine
from scheduler.request_stream import RequestStream

logger = logging.getLogger(__name__)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._connections: set[RouterConnection] = set()

    def drain(self) -> None:
        """Shutting down: every router is told to send new requests on a new call."""
        for connection in self._connections:
            connection.drain()

    async def Submit(
        self, request: scheduler_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        try:
            stream = self._start(request)
        except PagedServeError as exc:
            await abort_for(context, exc)
            return
        finished = False
        try:
            async for response in stream:
                yield response
            finished = True
        except PagedServeError as exc:
            await abort_for(context, exc)
        finally:
            # Cancel, deadline, error and normal end share this path: every block is freed.
            if not finished:
                self.engine.abort(request.request_id)

    async def Connect(
        self, request_iterator: AsyncIterator[scheduler_pb2.ConnectRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[scheduler_pb2.ConnectResponse]:
        connection = RouterConnection(self._start, self.engine.abort)
        self._connections.add(connection)
        reader = asyncio.create_task(self._read(request_iterator, connection))
        try:
            async for response in connection.updates():
                yield response
        finally:
            # Router gone, cancelled or half-closed and done: every block is freed.
            self._connections.discard(connection)
            reader.cancel()
            connection.close()

    @staticmethod
    async def _read(request_iterator: AsyncIterator[scheduler_pb2.ConnectRequest],
                    connection: RouterConnection) -> None:
        try:
            async for message in request_iterator:
                connection.handle(message)
        except grpc.aio.AioRpcError as exc:
            logger.info("router connection: %s", exc.code().name)
        connection.input_done()

    def _start(self, request: scheduler_pb2.SubmitRequest) -> RequestStream:
        """Resolves the params (a no-op for a router's, which are resolved already; a tool's
        ``Submit`` did not pass a router) and submits."""
        info = self.engine.model_info
        params = resolve_sampling_params(
            request.params,
            num_prompt_tokens=len(request.prompt_token_ids),
            max_model_len=info.max_model_len,
            max_tokens_limit=info.max_model_len,
            vocab_size=info.vocab_size,
            eos_token_ids=info.eos_token_ids,
        )
        return self.engine.submit(request.request_id, request.prompt_token_ids, params,
                                  request.generated_token_ids, request.cache_salt)

    async def Abort(
        self, request: scheduler_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.AbortResponse:
        return scheduler_pb2.AbortResponse(found=self.engine.abort(request.request_id))

    async def GetStats(
        self, request: scheduler_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SchedulerStats:
        return self.engine.stats()

    async def GetModelInfo(
        self, request: scheduler_pb2.SchedulerModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SchedulerModelInfo:
        return self.engine.model_info
