"""``Generation`` service: a thin adapter between the public API and the router's domain code.

Per ``Generate``: prepare (validate, tokenize) -> open ``Scheduler.Submit`` with the client's
remaining deadline -> feed each scheduler message through an ``OutputProcessor`` -> stream its
messages. Stop string, client cancel, deadline and error all leave through one ``finally`` that
cancels the upstream call (the scheduler then frees the request's blocks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from pagedserve.errors import PagedServeError
from pagedserve.grpc_util import abort_for, status_code_for
from protos.pagedserve.v1 import generation_pb2, generation_pb2_grpc, scheduler_pb2
from router import metrics
from router.output import OutputProcessor
from router.request import PreparedRequest, ServedModel, prepare_request, prompt_token_ids
from router.scheduler_client import SchedulerClient, SubmitStream
from router.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """Holds only what every request shares (tokenizer, scheduler channel, model facts)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        scheduler: SchedulerClient,
        model: ServedModel,
        *,
        max_tokens_limit: int,
        request_timeout_s: float,
    ) -> None:
        self._tokenizer = tokenizer
        self._scheduler = scheduler
        self._model = model
        self._max_tokens_limit = max_tokens_limit
        self._request_timeout_s = request_timeout_s

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        code = grpc.StatusCode.OK
        try:
            prepared = await asyncio.to_thread(
                prepare_request, request, self._tokenizer, self._model,
                max_tokens_limit=self._max_tokens_limit,
            )
            async for message in self._run(prepared, context):
                yield message
        except PagedServeError as exc:
            code = status_code_for(exc)
            logger.info("request %s: %s", request.request_id or "-", exc)
            await abort_for(context, exc)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            metrics.REQUESTS.labels(code=code.name).inc()

    async def _run(
        self, prepared: PreparedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        processor = OutputProcessor(
            prepared.request_id, self._tokenizer, prepared.params, prepared.num_prompt_tokens
        )
        stream = self._scheduler.submit(self._submit_request(prepared), self._timeout_s(context))
        context.add_done_callback(lambda _ctx: stream.cancel())  # client gone: abort upstream now
        logger.info("request %s: %d prompt tokens, max_tokens %d, n %d", prepared.request_id,
                    prepared.num_prompt_tokens, prepared.params.max_tokens, prepared.params.n)
        metrics.PROMPT_TOKENS.inc(prepared.num_prompt_tokens)
        try:
            async for message in _stream_outputs(processor, stream, time.monotonic()):
                yield message
        finally:
            stream.cancel()

    @staticmethod
    def _submit_request(prepared: PreparedRequest) -> scheduler_pb2.SubmitRequest:
        return scheduler_pb2.SubmitRequest(
            request_id=prepared.request_id, prompt_token_ids=prepared.prompt_token_ids,
            params=prepared.params,
        )

    def _timeout_s(self, context: grpc.aio.ServicerContext) -> float | None:
        """The client's remaining deadline, capped by the router's own request timeout."""
        limits = [t for t in (context.time_remaining(), self._request_timeout_s or None) if t]
        return min(limits) if limits else None

    async def GetModelInfo(
        self, request: generation_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.ModelInfo:
        return generation_pb2.ModelInfo(
            model=self._model.name, max_model_len=self._model.context_len,
            vocab_size=self._model.vocab_size, max_tokens_limit=self._max_tokens_limit,
            has_chat_template=self._tokenizer.has_chat_template, block_size=self._model.block_size,
        )

    async def Tokenize(
        self, request: generation_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.TokenizeResponse:
        try:
            ids = await asyncio.to_thread(
                prompt_token_ids, request, self._tokenizer, self._model.vocab_size
            )
        except PagedServeError as exc:
            await abort_for(context, exc)
        return generation_pb2.TokenizeResponse(
            token_ids=ids, tokens=[self._tokenizer.id_to_token(i) for i in ids]
        )


async def _stream_outputs(
    processor: OutputProcessor, stream: SubmitStream, started: float
) -> AsyncIterator[generation_pb2.GenerateResponse]:
    """Runs the scheduler's stream through ``processor`` until every output is finished."""
    first_token_seen = False
    async for response in stream:
        for message in processor.process(response):
            if message.token_ids and not first_token_seen:
                first_token_seen = True
                metrics.TIME_TO_FIRST_TOKEN.observe(time.monotonic() - started)
            metrics.GENERATED_TOKENS.inc(len(message.token_ids))
            yield message
        if processor.all_finished:
            logger.debug("request %s: all outputs finished", processor.request_id)
            return
    for message in processor.abort_unfinished():
        logger.warning("request %s: scheduler stream ended before output %d finished",
                       processor.request_id, message.index)
        yield message
