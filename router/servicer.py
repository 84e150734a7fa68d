"""``Generation`` service: a thin gRPC adapter over the router's protocol-independent request code
(``router/generation.py``), which the OpenAI-compatible HTTP API (``router/http_server.py``) runs
too.

Per ``Generate``: describe the call (deadline, metadata, done callback) -> prepare -> stream the
messages. A ``PagedServeError`` becomes the status code it names, in one place
(``pagedserve.core.grpc_util.abort_for``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import grpc

from pagedserve.core.errors import PagedServeError
from pagedserve.core.grpc_util import abort_for
from protos.pagedserve.v1 import generation_pb2, generation_pb2_grpc
from router.generation import CallInfo, GenerationService


def grpc_call_info(context: grpc.aio.ServicerContext) -> CallInfo:
    """The call as the shared request code sees it."""
    remaining = context.time_remaining()

    def add_done_callback(callback: Callable[[], None]) -> None:
        context.add_done_callback(lambda _ctx: callback())

    return CallInfo(
        protocol="grpc",
        deadline=None if remaining is None else time.monotonic() + remaining,
        metadata={k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)},
        peer=context.peer() or "",
        add_done_callback=add_done_callback,
    )


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, service: GenerationService) -> None:
        self._service = service

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        try:
            async with self._service.request(grpc_call_info(context)) as scope:
                prepared = await scope.prepare(request)
                async with contextlib.aclosing(scope.stream(prepared)) as messages:
                    async for message in messages:
                        yield message
        except PagedServeError as exc:
            await abort_for(context, exc)

    async def GetModelInfo(
        self, request: generation_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.ModelInfo:
        service = self._service
        try:
            service.authenticate(grpc_call_info(context).metadata)
        except PagedServeError as exc:
            await abort_for(context, exc)
        return generation_pb2.ModelInfo(
            model=service.model.name, max_model_len=service.model.context_len,
            vocab_size=service.model.vocab_size, max_tokens_limit=service.max_tokens_limit,
            has_chat_template=service.tokenizer.has_chat_template,
            block_size=service.model.block_size,
        )

    async def Tokenize(
        self, request: generation_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.TokenizeResponse:
        try:
            ids = await self._service.tokenize(request, grpc_call_info(context))
        except PagedServeError as exc:
            await abort_for(context, exc)
        return generation_pb2.TokenizeResponse(
            token_ids=ids, tokens=[self._service.tokenizer.id_to_token(i) for i in ids]
        )
