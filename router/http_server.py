"""The router's OpenAI-compatible HTTP API (aiohttp), served beside gRPC on the same event loop.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming as server-sent events
ending with ``data: [DONE]``, or one JSON response), ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /health``, ``POST /tokenize``, ``POST /detokenize``.

Every generation request runs through the same code as a gRPC ``Generate``
(``router/generation.py``): the same admission (validation, tokenizing, and whatever
authentication or rate limit is added there), the same submit on the router's single
``Scheduler.Connect`` call, the same deadline (``X-Request-Timeout: SECONDS``, capped by the
router's ``--request-timeout-s``), the same metrics (``protocol="http"``). A stream's status and
headers go out with its first token, so a refusal before it (queue full, no worker, deadline) is
an HTTP status. The server cancels a handler whose client disconnects (``handler_cancellation``),
which aborts its requests upstream: the scheduler frees their blocks, as for a cancelled gRPC
call. Errors use OpenAI's shape with the HTTP status that ``router.openai_protocol.HTTP_STATUS``
maps their gRPC code to; an error after a stream started is sent as a last
``data: {"error": ...}`` event before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pagedserve.core.errors import InvalidArgument, PagedServeError, Unauthenticated
from pagedserve.core.grpc_util import TlsConfig, retry_after, server_ssl_context
from protos.pagedserve.v1 import generation_pb2
from router.generation import CallInfo, GenerationService
from router.openai_protocol import (
    OpenAIRequest,
    ResponseBuilder,
    error_body,
    error_response,
    parse_chat_request,
    parse_completion_request,
    parse_messages,
)
from router.request import PreparedRequest, check_model, checked_token_ids

logger = logging.getLogger(__name__)

TIMEOUT_HEADER = "X-Request-Timeout"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Messages = AsyncGenerator[tuple[int, generation_pb2.GenerateResponse], None]


def _dumps(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _json(body: Any, status: int = 200, request_id: str = "",
          headers: dict[str, str] | None = None) -> web.Response:
    headers = dict(headers or {})
    if request_id:
        headers["X-Request-Id"] = request_id
    return web.Response(body=_dumps(body), status=status, content_type="application/json",
                        headers=headers)


def _error(exc: BaseException, rename: Callable[[str], str] | None = None,
           request_id: str = "") -> web.Response:
    """OpenAI's error shape; a rate-limit refusal says ``Retry-After``, a missing or wrong API
    key ``WWW-Authenticate``."""
    status, body = error_response(exc, rename)
    headers = {}
    hint = retry_after(exc)
    if hint is not None:
        headers["Retry-After"] = hint
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return _json(body, status, request_id, headers)


@web.middleware
async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown paths and methods answer in OpenAI's error shape too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = error_body(exc.status, f"{request.method} {request.path}: {exc.reason}",
                          exc.reason.lower().replace(" ", "_"))
        return _json(body, exc.status)


def _authenticating(service: GenerationService) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Every route but ``/health`` needs a valid API key (``Authorization: Bearer``) when keys
    are configured: 401 in OpenAI's error shape otherwise (``router/auth.py``)."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/health":
            try:
                service.authenticate(request.headers)
            except PagedServeError as exc:
                return _error(exc)
        return await handler(request)

    return authenticate


class HttpApi:
    """The handlers; holds the shared ``GenerationService`` and whether the router serves."""

    def __init__(self, service: GenerationService) -> None:
        self._service = service
        self._created = int(time.time())
        self.serving = False

    def app(self) -> web.Application:
        # As the gRPC port: no body larger than an acceptable prompt needs (413 beyond it).
        app = web.Application(client_max_size=self._service.prompt_limits.max_request_bytes,
                              middlewares=[_openai_errors, _authenticating(self._service)])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        return app

    # --- small endpoints -----------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """200 while the router serves; 503 once it is stopping (as gRPC health NOT_SERVING)."""
        if self.serving:
            return _json({"status": "ok"})
        return _json({"status": "stopping"}, 503)

    def _model_card(self) -> dict[str, Any]:
        model = self._service.model
        return {"id": model.name, "object": "model", "created": self._created,
                "owned_by": "pagedserve", "root": model.name, "max_model_len": model.context_len}

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        try:
            check_model(request.match_info["model"], self._service.model)
        except PagedServeError as exc:
            return _error(exc)
        return _json(self._model_card())

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``/tokenize``: ``{"prompt": str}`` or ``{"messages": [...]}`` ->
        ``{"count", "max_model_len", "tokens"}`` (+ ``token_strs`` with
        ``return_token_strs``), by the same code as gRPC ``Tokenize``."""
        try:
            body = await _body(request)
            _check_body_model(body, self._service)
            if "messages" in body:
                tokenize = generation_pb2.TokenizeRequest(chat=parse_messages(body["messages"]))
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise InvalidArgument("prompt", "must be a string (or send messages)")
                tokenize = generation_pb2.TokenizeRequest(text=prompt)
            ids = await self._service.tokenize(tokenize, http_call_info(request))
        except PagedServeError as exc:
            return _error(exc, _tokenize_name)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self._service.model.context_len,
                               "tokens": ids}
        if body.get("return_token_strs") is True:
            out["token_strs"] = [self._service.tokenizer.id_to_token(i) for i in ids]
        return _json(out)

    async def detokenize(self, request: web.Request) -> web.Response:
        """``{"tokens": [ids]}`` -> ``{"prompt": text}``."""
        try:
            body = await _body(request)
            _check_body_model(body, self._service)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise InvalidArgument("tokens", "must be a list of token ids")
            ids = checked_token_ids(tokens, self._service.model.vocab_size, field="tokens")
        except PagedServeError as exc:
            return _error(exc)
        return _json({"prompt": self._service.tokenizer.decode(ids)})

    # --- generation ----------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion_request)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat_request)

    async def _generate(self, request: web.Request,
                        parse: Callable[[Any, str], OpenAIRequest]) -> web.StreamResponse:
        request_id = request.headers.get("X-Request-Id", "")
        try:
            call = http_call_info(request)
            parsed = parse(await _body(request), request_id)
        except PagedServeError as exc:
            return _error(exc, request_id=request_id)
        response_id = request_id or uuid.uuid4().hex
        builder = ResponseBuilder(parsed, response_id, self._service.model.name, int(time.time()),
                                  self._service.tokenizer)
        response: web.StreamResponse | None = None
        failed = 0  # the prompt whose error this is (a batch names its prompt)
        try:
            async with contextlib.AsyncExitStack() as stack:
                scopes = [await stack.enter_async_context(self._service.request(call))
                          for _ in parsed.requests]
                prepared: list[PreparedRequest] = []
                for scope, generate in zip(scopes, parsed.requests, strict=True):
                    failed = len(prepared)
                    prepared.append(await scope.prepare(generate))
                builder.set_prompt_tokens([p.num_prompt_tokens for p in prepared])
                messages = _merge([scope.stream(p) for scope, p in zip(scopes, prepared,
                                                                       strict=True)])
                stack.push_async_callback(messages.aclose)
                if not parsed.stream:
                    async for index, message in messages:
                        builder.add(index, message)
                    return _json(builder.response(), request_id=response_id)
                # The status goes out with the first token: a refusal that comes before it
                # (queue full, no worker, deadline) is still an HTTP status, not a stream error.
                first = await anext(messages, None)
                response = await _start_events(request, response_id)
                for opening in builder.first_chunks():
                    await _send(response, opening)
                if first is not None:
                    await _send_message(response, builder, *first)
                async for index, message in messages:
                    await _send_message(response, builder, index, message)
                if parsed.include_usage:
                    await _send(response, builder.usage_chunk())
        except PagedServeError as exc:
            def rename(name: str) -> str:
                return parsed.param_name(name, failed)

            if response is None:
                return _error(exc, rename, response_id)
            logger.info("request %s: stream ended by %s", response_id, exc)
            await _send(response, error_response(exc, rename)[1])
        assert response is not None
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def http_call_info(request: web.Request) -> CallInfo:
    """The call as the shared request code sees it; ``X-Request-Timeout`` is its deadline."""
    deadline = None
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is not None:
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise InvalidArgument(TIMEOUT_HEADER, f"must be a number of seconds > 0, got {raw!r}")
        deadline = time.monotonic() + seconds
    return CallInfo(protocol="http", deadline=deadline, metadata=request.headers,
                    peer=request.remote or "")


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument("body", f"is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    return body


def _check_body_model(body: dict[str, Any], service: GenerationService) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidArgument("model", "must be a string")
    check_model(model or "", service.model)


def _tokenize_name(name: str) -> str:
    if name.startswith("prompt.chat.messages"):
        return "messages" + name[len("prompt.chat.messages"):]
    return "messages" if name == "prompt.chat" else name.replace("prompt.text", "prompt")


async def _start_events(request: web.Request, request_id: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Cache-Control": "no-cache",
                                           "X-Request-Id": request_id})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    return response


async def _send(response: web.StreamResponse, body: Any) -> None:
    await response.write(b"data: " + _dumps(body) + b"\n\n")


async def _send_message(response: web.StreamResponse, builder: ResponseBuilder, index: int,
                        message: generation_pb2.GenerateResponse) -> None:
    chunk = builder.chunk(index, message)
    if chunk is not None:
        await _send(response, chunk)


async def _merge(streams: list[AsyncGenerator[generation_pb2.GenerateResponse, None]]
                 ) -> Messages:
    """``(prompt index, message)`` from every stream as it comes; closing this closes them.
    One stream (the common case) is read directly, without tasks."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for message in only:
                yield 0, message
        return
    queue: asyncio.Queue[tuple[int, generation_pb2.GenerateResponse | BaseException | None]]
    queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[generation_pb2.GenerateResponse]) -> None:
        try:
            async for message in stream:
                queue.put_nowait((index, message))
            queue.put_nowait((index, None))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait((index, exc))

    async def owned(index: int, stream: AsyncGenerator[generation_pb2.GenerateResponse, None]
                    ) -> None:
        async with contextlib.aclosing(stream):
            await pump(index, stream)

    tasks = [asyncio.create_task(owned(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class HttpServer:
    """A started HTTP API: ``stop`` answers ``/health`` 503 at once, lets in-flight requests
    run for the grace period, then cancels them (their requests are aborted upstream)."""

    api: HttpApi
    runner: web.AppRunner
    host: str
    port: int
    tls: bool = False
    cert_watch: asyncio.Task[None] | None = None  # reloads rotated certificates (HTTPS)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def set_serving(self, serving: bool) -> None:
        self.api.serving = serving

    async def stop(self) -> None:
        self.api.serving = False
        if self.cert_watch is not None:
            self.cert_watch.cancel()
        await self.runner.cleanup()


async def start_http_server(service: GenerationService, host: str, port: int,
                            grace_s: float, tls: TlsConfig | None = None) -> HttpServer:
    """Binds ``host:port`` (0 = any free port) on the running event loop, HTTPS when ``tls``
    has a certificate (rotated files are picked up without a restart:
    ``pagedserve.core.grpc_util.ServerSslContext``); ``/health`` answers 503 until
    ``set_serving(True)``."""
    api = HttpApi(service)
    runner = web.AppRunner(api.app(), handler_cancellation=True, shutdown_timeout=grace_s,
                           access_log=None)
    await runner.setup()
    https = server_ssl_context(tls) if tls is not None else None
    site = web.TCPSite(runner, host, port, ssl_context=https.context if https else None)
    await site.start()
    bound = runner.addresses[0][1]
    logger.info("router OpenAI-compatible HTTP API on %s:%d%s", host, bound,
                " (HTTPS)" if https is not None else "")
    return HttpServer(api, runner, host, bound, https is not None,
                      asyncio.create_task(https.watch()) if https is not None else None)
