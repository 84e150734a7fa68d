"""``Generation`` service: a thin adapter between the public API and the router's domain code.

Per ``Generate``: prepare (validate, tokenize) -> submit on the router's shared
``Scheduler.Connect`` call with the client's remaining deadline -> feed each of the request's
updates through an ``OutputProcessor`` -> stream its messages. Stop string, client cancel,
deadline and error all leave through one ``finally`` that aborts the request upstream (the
scheduler then frees its blocks), and one outer ``finally`` that records the request's outcome,
status code, tokens and latencies.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry

from pagedserve.errors import PagedServeError
from pagedserve.grpc_util import abort_for, status_code_for
from protos.pagedserve.v1 import generation_pb2, generation_pb2_grpc, scheduler_pb2
from router.metrics import RouterMetrics, outcome_for_code
from router.output import OutputProcessor
from router.request import PreparedRequest, ServedModel, prepare_request, prompt_token_ids
from router.scheduler_client import SchedulerClient, SubmitStream, UpstreamError
from router.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MAX_CONTINUATIONS = 5  # resubmissions of one request after its scheduler went away


@dataclass
class _RequestRecord:
    """What the metrics need of one request, filled in as it streams."""

    started: float = field(default_factory=time.monotonic)
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    reached_scheduler: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None

    def tokens_streamed(self, num_tokens: int, metrics: RouterMetrics) -> None:
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
            metrics.observe_ttft(now - self.started)
        elif self.last_token_at is not None:
            metrics.observe_inter_token(now - self.last_token_at)
        self.last_token_at = now
        self.num_generated_tokens += num_tokens

    def finish(self, code: grpc.StatusCode, metrics: RouterMetrics) -> None:
        end = self.last_token_at or time.monotonic()
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        metrics.request_finished(
            outcome_for_code(code.name), code.name, self.num_prompt_tokens,
            self.num_generated_tokens, end - self.started if self.reached_scheduler else None,
            ttft)


def _cancel_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """A cancelled handler: the client's deadline passed, or the client went away."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


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
        metrics: RouterMetrics | None = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else RouterMetrics(CollectorRegistry())
        self._tokenizer = tokenizer
        self._scheduler = scheduler
        self._model = model
        self._max_tokens_limit = max_tokens_limit
        self._request_timeout_s = request_timeout_s

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        record = _RequestRecord()
        code = grpc.StatusCode.UNKNOWN  # until proven otherwise: an unexpected exception
        with self._metrics.track_stream():
            try:
                prepared = await self._prepare(request)
                async for message in self._run(prepared, context, record):
                    yield message
                code = grpc.StatusCode.OK
            except PagedServeError as exc:
                code = status_code_for(exc)
                logger.info("request %s: %s", request.request_id or "-", exc)
                await abort_for(context, exc)
            except (asyncio.CancelledError, GeneratorExit):
                code = _cancel_code(context)
                raise
            finally:
                record.finish(code, self._metrics)

    async def _prepare(self, request: generation_pb2.GenerateRequest) -> PreparedRequest:
        """Tokenizing runs in a thread (long texts must not stall the streams); token ids are
        only checked, which is cheaper here than a thread hand-off."""
        prepare = functools.partial(prepare_request, request, self._tokenizer, self._model,
                                    max_tokens_limit=self._max_tokens_limit)
        if request.WhichOneof("prompt") == "token_ids":
            return prepare()
        return await asyncio.to_thread(prepare)

    async def _run(
        self, prepared: PreparedRequest, context: grpc.aio.ServicerContext,
        record: _RequestRecord,
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        processor = OutputProcessor(
            prepared.request_id, self._tokenizer, prepared.params, prepared.num_prompt_tokens
        )
        logger.info("request %s: %d prompt tokens, max_tokens %d, n %d", prepared.request_id,
                    prepared.num_prompt_tokens, prepared.params.max_tokens, prepared.params.n)
        record.num_prompt_tokens = prepared.num_prompt_tokens
        record.reached_scheduler = True
        generated: list[int] = []  # output 0 so far: what a continuation must not redo
        current: list[SubmitStream] = []

        def cancel_current(_ctx: object) -> None:  # the client went away
            if current:
                current[-1].cancel()

        context.add_done_callback(cancel_current)
        for attempt in range(MAX_CONTINUATIONS + 1):
            stream = self._scheduler.submit(
                self._submit_request(prepared, generated, self._timeout_s(context)))
            current.append(stream)
            try:
                async for message in _stream_outputs(processor, _recording(stream, generated)):
                    if message.token_ids:
                        record.tokens_streamed(len(message.token_ids), self._metrics)
                    yield message
                return
            except UpstreamError as exc:
                if not self._may_continue(exc, prepared, attempt):
                    raise
                logger.warning("request %s: scheduler unavailable (%s); continuing after %d "
                               "tokens", prepared.request_id, exc, len(generated))
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
            finally:
                stream.cancel()

    @staticmethod
    def _may_continue(exc: UpstreamError, prepared: PreparedRequest, attempt: int) -> bool:
        """A scheduler that went away (restart, failover) loses nothing the router does not
        hold: a single-output request is resubmitted as a continuation (prompt + the tokens
        already streamed, recomputed), so the client sees no gap."""
        p = prepared.params
        single = p.n == 1 and p.best_of <= 1 and p.beam_width <= 1
        return exc.code == "UNAVAILABLE" and single and attempt < MAX_CONTINUATIONS

    @staticmethod
    def _submit_request(prepared: PreparedRequest, generated: list[int],
                        timeout_s: float | None) -> scheduler_pb2.SubmitRequest:
        return scheduler_pb2.SubmitRequest(
            request_id=prepared.request_id, prompt_token_ids=prepared.prompt_token_ids,
            params=prepared.params, generated_token_ids=generated, timeout_s=timeout_s or 0.0,
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


async def _recording(
    stream: SubmitStream, generated: list[int]
) -> AsyncIterator[scheduler_pb2.RequestUpdate]:
    """Passes the scheduler's stream through, remembering output 0's token ids."""
    async for response in stream:
        for out in response.outputs:
            if out.index == 0 and not out.replaces:
                generated.extend(out.token_ids)
        yield response


async def _stream_outputs(
    processor: OutputProcessor, stream: AsyncIterator[scheduler_pb2.RequestUpdate]
) -> AsyncIterator[generation_pb2.GenerateResponse]:
    """Runs the scheduler's stream through ``processor`` until every output is finished."""
    async for response in stream:
        for message in processor.process(response):
            yield message
        if processor.all_finished:
            logger.debug("request %s: all outputs finished", processor.request_id)
            return
    for message in processor.abort_unfinished():
        logger.warning("request %s: scheduler stream ended before output %d finished",
                       processor.request_id, message.index)
        yield message
