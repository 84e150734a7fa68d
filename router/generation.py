"""One request's life in the router, whichever public API carried it.

Both front ends, the gRPC ``Generation`` service (``router/servicer.py``) and the
OpenAI-compatible HTTP API (``router/http_server.py``), describe their call as a ``CallInfo``,
turn the request into a ``GenerateRequest`` and run it here, by the same code::

    async with service.request(call) as scope:      # in flight; outcome recorded when it ends
        prepared = await scope.prepare(request)     # the one admission path (raises)
        async for message in scope.stream(prepared):
            ...                                     # GenerateResponse messages

``RequestScope.prepare`` is the only way into the scheduler, for both protocols: the API key
(``authorization: Bearer``, from ``CallInfo.metadata``: gRPC metadata or HTTP headers,
``router/auth.py``), the key's rate limits (``router/rate_limit.py``), then validation and
tokenizing (``GenerationService.prepare``) and the request's prefix-cache partition (the key's
and the client's salt, ``router/cache_salt.py``); prompt tokens are charged to the key there and
generated tokens as they stream. ``scope.stream`` submits on the router's shared
``Scheduler.Connect`` call with the client's remaining deadline, feeds each update through an
``OutputProcessor`` and yields its messages; stop string, client cancel, deadline and error all
leave through one ``finally`` that aborts the request upstream (the scheduler then frees its
blocks). The scope records outcome, status code, tokens and latencies once, when it exits:
``OK``, the code of the ``PagedServeError`` that left it, or ``CANCELLED``/``DEADLINE_EXCEEDED``
when the client went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from pagedserve.core.errors import PagedServeError
from protos.pagedserve.v1 import generation_pb2, scheduler_pb2
from router.auth import ANONYMOUS, ApiKeys
from router.cache_salt import CacheIsolation, request_cache_salt
from router.config import DEFAULT_MAX_PROMPT_BYTES
from router.metrics import RouterMetrics, outcome_for_code
from router.output import OutputProcessor
from router.rate_limit import LimitExceeded, RateLimitConfig, RateLimiter
from router.request import (
    PreparedRequest,
    PromptLimits,
    ServedModel,
    prepare_request,
    prompt_token_ids,
)
from router.scheduler_client import SchedulerClient, SubmitStream, UpstreamError
from router.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MAX_CONTINUATIONS = 5  # resubmissions of one request after its scheduler went away


@dataclass
class CallInfo:
    """What the router needs of the call that carries a request, whichever protocol.

    ``deadline`` is the ``time.monotonic()`` value by which the client wants its answer (None =
    it set none). ``metadata`` maps lower-case names to values (gRPC metadata, HTTP headers).
    ``add_done_callback`` registers a callback run when the call ends for any reason (gRPC);
    None where the protocol cancels the handler itself when the client goes away (HTTP)."""

    protocol: str
    deadline: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    peer: str = ""
    add_done_callback: Callable[[Callable[[], None]], None] | None = None

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def cancel_code(self) -> str:
        """The status of a request whose handler was cancelled: the client's deadline passed,
        or the client went away."""
        remaining = self.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


@dataclass
class _RequestRecord:
    """What the metrics need of one request, filled in as it streams."""

    metrics: RouterMetrics
    protocol: str
    started: float = field(default_factory=time.monotonic)
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    reached_scheduler: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None

    def tokens_streamed(self, num_tokens: int) -> None:
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.observe_ttft(now - self.started, self.protocol)
        elif self.last_token_at is not None:
            self.metrics.observe_inter_token(now - self.last_token_at, self.protocol)
        self.last_token_at = now
        self.num_generated_tokens += num_tokens

    def finish(self, code: str) -> None:
        end = self.last_token_at or time.monotonic()
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        self.metrics.request_finished(
            outcome_for_code(code), code, self.num_prompt_tokens, self.num_generated_tokens,
            end - self.started if self.reached_scheduler else None, ttft, protocol=self.protocol)


class GenerationService:
    """Holds only what every request shares (tokenizer, scheduler channel, model facts, API keys
    and their rate limits)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        scheduler: SchedulerClient,
        model: ServedModel,
        *,
        max_tokens_limit: int,
        request_timeout_s: float,
        metrics: RouterMetrics | None = None,
        api_keys: ApiKeys | None = None,
        rate_limits: RateLimitConfig | None = None,
        max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
        max_prompt_tokens: int = 0,
        cache_isolation: CacheIsolation = CacheIsolation.NONE,
    ) -> None:
        """``max_prompt_tokens`` 0 = the model's context (``router/config.py``);
        ``cache_isolation``: whose requests share prefix-cache blocks."""
        self.metrics = metrics if metrics is not None else RouterMetrics(CollectorRegistry())
        self.tokenizer = tokenizer
        self.model = model
        self.max_tokens_limit = max_tokens_limit
        self.prompt_limits = PromptLimits(max_prompt_bytes,
                                          max_prompt_tokens or model.context_len)
        self._scheduler = scheduler
        self._request_timeout_s = request_timeout_s
        self._keys = api_keys if api_keys is not None else ApiKeys([])
        self._rate_limits = rate_limits or RateLimitConfig()
        self._limiter = RateLimiter(self._rate_limits,
                                    per_key=self._keys.rate_limits(self._rate_limits))
        self._cache_isolation = cache_isolation
        self.metrics.add_keys(self._keys.key_ids or [ANONYMOUS])
        self._keys.on_reload(self._keys_reloaded)

    def _keys_reloaded(self, keys: ApiKeys) -> None:
        self.metrics.add_keys(keys.key_ids)
        self._limiter.set_per_key(keys.rate_limits(self._rate_limits))

    def authenticate(self, metadata: Mapping[str, str]) -> str:
        """The caller's API key id (``router/auth.py``); raises ``Unauthenticated``."""
        return self._keys.authenticate(metadata)

    def admit(self, call: CallInfo) -> str:
        """Authenticates the call and takes one request from its key's rate limit; the key id.
        Raises ``Unauthenticated`` or ``RateLimited``."""
        key_id = self.authenticate(call.metadata)
        self.metrics.key_request(key_id)
        try:
            self._limiter.admit_request(key_id)
        except LimitExceeded as exc:
            self.metrics.key_rate_limited(key_id, exc.limit)
            raise
        return key_id

    def charge_tokens(self, key_id: str, num_tokens: int) -> None:
        """Charges tokens a request of ``key_id`` used to its token rate limit."""
        self._limiter.charge_tokens(key_id, num_tokens)
        self.metrics.key_tokens(key_id, num_tokens)

    @contextlib.asynccontextmanager
    async def request(self, call: CallInfo) -> AsyncIterator[RequestScope]:
        """One request, counted in flight while the block runs and recorded once when it
        exits, with the status it exits with."""
        scope = RequestScope(self, call)
        code = "UNKNOWN"  # until proven otherwise: an unexpected exception
        with self.metrics.track_stream(call.protocol):
            try:
                yield scope
                code = "OK"
            except PagedServeError as exc:
                code = exc.code
                logger.info("request %s: %s", scope.request_id or "-", exc)
                raise
            except (asyncio.CancelledError, GeneratorExit, ConnectionError):
                code = call.cancel_code()  # ConnectionError: an HTTP client gone mid-write
                raise
            finally:
                scope.record.finish(code)

    async def prepare(self, request: generation_pb2.GenerateRequest, call: CallInfo,
                      key_id: str = ANONYMOUS) -> PreparedRequest:
        """Admits one request of ``key_id``, for every protocol: checks it, tokenizes its
        prompt and puts it in its prefix-cache partition. Tokenizing runs in a thread (long texts
        must not stall the streams); token ids are only checked, which is cheaper here than a
        thread hand-off. Raises ``PagedServeError``."""
        prepare = functools.partial(prepare_request, request, self.tokenizer, self.model,
                                    max_tokens_limit=self.max_tokens_limit,
                                    limits=self.prompt_limits)
        if request.WhichOneof("prompt") == "token_ids":
            prepared = prepare()
        else:
            prepared = await asyncio.to_thread(prepare)
        salt = request_cache_salt(self._cache_isolation, key_id, request.cache_salt)
        return dataclasses.replace(prepared, cache_salt=salt)

    async def tokenize(self, request: generation_pb2.TokenizeRequest,
                       call: CallInfo) -> list[int]:
        """A prompt's token ids, exactly as ``prepare`` would tokenize it (for a caller with a
        valid API key)."""
        self.authenticate(call.metadata)
        return await asyncio.to_thread(
            prompt_token_ids, request, self.tokenizer, self.model.vocab_size, self.prompt_limits)

    def timeout_s(self, call: CallInfo) -> float | None:
        """The client's remaining deadline, capped by the router's own request timeout."""
        limits = [t for t in (call.time_remaining(), self._request_timeout_s or None) if t]
        return min(limits) if limits else None

    def submit(self, request: scheduler_pb2.SubmitRequest) -> SubmitStream:
        return self._scheduler.submit(request)


class RequestScope:
    """One request inside ``GenerationService.request``: admit it, then stream it."""

    def __init__(self, service: GenerationService, call: CallInfo) -> None:
        self._service = service
        self._call = call
        self.request_id = ""
        self.key_id = ""
        self.record = _RequestRecord(service.metrics, call.protocol)

    async def prepare(self, request: generation_pb2.GenerateRequest) -> PreparedRequest:
        """Admits the request: its API key and rate limits, then validation and tokenizing.
        ``request_id`` (logged) is set once checked: a refused one never reaches a log line."""
        self.key_id = self._service.admit(self._call)
        prepared = await self._service.prepare(request, self._call, self.key_id)
        self.request_id = prepared.request_id
        self._service.charge_tokens(self.key_id, prepared.num_prompt_tokens)
        return prepared

    async def stream(self, prepared: PreparedRequest
                     ) -> AsyncGenerator[generation_pb2.GenerateResponse, None]:
        """The request's messages, until every output finished. A scheduler that goes away
        mid-stream loses nothing the router holds: a single-output request is resubmitted as a
        continuation (prompt + the tokens already streamed), so the client sees no gap."""
        service, record = self._service, self.record
        processor = OutputProcessor(
            prepared.request_id, service.tokenizer, prepared.params, prepared.num_prompt_tokens
        )
        logger.info("request %s: %d prompt tokens, max_tokens %d, n %d (%s, key %s)",
                    prepared.request_id, prepared.num_prompt_tokens, prepared.params.max_tokens,
                    prepared.params.n, self._call.protocol, self.key_id)
        record.num_prompt_tokens = prepared.num_prompt_tokens
        record.reached_scheduler = True
        generated: list[int] = []  # output 0 so far: what a continuation must not redo
        current: list[SubmitStream] = []

        def cancel_current() -> None:  # the client went away
            if current:
                current[-1].cancel()

        if self._call.add_done_callback is not None:
            self._call.add_done_callback(cancel_current)
        for attempt in range(MAX_CONTINUATIONS + 1):
            stream = service.submit(
                _submit_request(prepared, generated, service.timeout_s(self._call)))
            current.append(stream)
            try:
                async for message in _stream_outputs(processor, _recording(stream, generated)):
                    if message.token_ids:
                        record.tokens_streamed(len(message.token_ids))
                        service.charge_tokens(self.key_id, len(message.token_ids))
                    yield message
                return
            except UpstreamError as exc:
                if not _may_continue(exc, prepared, attempt):
                    raise
                logger.warning("request %s: scheduler unavailable (%s); continuing after %d "
                               "tokens", prepared.request_id, exc, len(generated))
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
            finally:
                stream.cancel()


def _may_continue(exc: UpstreamError, prepared: PreparedRequest, attempt: int) -> bool:
    """Only a single-output request can be continued (n samples or beams cannot be rebuilt
    from output 0), and only after the scheduler went away (``UNAVAILABLE``)."""
    p = prepared.params
    single = p.n == 1 and p.best_of <= 1 and p.beam_width <= 1
    return exc.code == "UNAVAILABLE" and single and attempt < MAX_CONTINUATIONS


def _submit_request(prepared: PreparedRequest, generated: list[int],
                    timeout_s: float | None) -> scheduler_pb2.SubmitRequest:
    return scheduler_pb2.SubmitRequest(
        request_id=prepared.request_id, prompt_token_ids=prepared.prompt_token_ids,
        params=prepared.params, generated_token_ids=generated, timeout_s=timeout_s or 0.0,
        cache_salt=prepared.cache_salt,
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
