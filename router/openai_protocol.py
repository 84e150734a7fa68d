"""The OpenAI HTTP API's shapes, mapped onto pagedserve's own: requests, responses and errors.

Requests. ``parse_completion_request`` and ``parse_chat_request`` check each field's JSON type
and build the ``GenerateRequest``s (one per prompt: ``/v1/completions`` takes a batch) that the
router's one admission path (``router/generation.py``) then checks like any gRPC request: ranges
and defaults are decided there, once. An error from there names our field (``params.top_p``,
``prompt.chat.messages[1].role``); ``OpenAIRequest.param_name`` turns it into the name this client
sent (``top_p``, ``messages[1].role``, ``max_completion_tokens``, ``prompt[2]``).

Mapped fields: ``max_tokens`` (``/v1/completions`` default 16, as OpenAI's) or
``max_completion_tokens``, ``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``logprobs``
(completions: how many top logprobs; chat: a flag, with ``top_logprobs``), ``presence_penalty``,
``frequency_penalty``, and vLLM's extensions ``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``min_tokens``, ``best_of``, ``use_beam_search`` (beam width = ``best_of``, else
``n``), ``length_penalty``, ``early_stopping``, ``stop_token_ids``,
``include_stop_str_in_output``, and ``cache_salt`` (a prefix-cache partition of the
client's own, ``router/cache_salt.py``). Fields that would change the answer but are not supported
(``echo``, ``suffix``, ``logit_bias``, tools, a non-text ``response_format``) are refused; other
unknown fields are ignored, as vLLM does.

Responses. ``ResponseBuilder`` turns each prompt's ``GenerateResponse`` messages into OpenAI's
chunks (streaming) or its one response object, with ``usage`` (prompt, completion and cached
tokens) and logprobs in the endpoint's format. Choice ``i`` of prompt ``p`` is index
``p * n + i``.

Errors. ``HTTP_STATUS`` is the one table from a gRPC status code (the code every
``PagedServeError`` names) to an HTTP status; ``error_response`` gives OpenAI's error shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pagedserve.core.errors import InvalidArgument, ModelNotFound, PagedServeError
from protos.pagedserve.v1 import common_pb2, generation_pb2
from router.tokenizer import Tokenizer

COMPLETION = "completion"
CHAT = "chat"
#: OpenAI's default ``max_tokens`` for ``/v1/completions`` (chat leaves it to the server).
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_BATCH_PROMPTS = 256
MIN_LOGPROB = -9999.0  # what a -inf logprob is sent as (JSON has no infinity)

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}

#: gRPC status code name -> HTTP status. The only place a code becomes an HTTP status.
HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,  # the client closed the request (nginx's code); nobody reads it
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "invalid_request_error",
                409: "invalid_request_error", 429: "rate_limit_error"}


def http_status(code: str) -> int:
    return HTTP_STATUS.get(code, 500)


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    exc: BaseException, rename: Callable[[str], str] | None = None
) -> tuple[int, dict[str, Any]]:
    """``(HTTP status, body)`` for an exception; ``rename`` turns our field names into the
    client's. Anything but a ``PagedServeError`` is a bug here: 500, without details."""
    if not isinstance(exc, PagedServeError):
        return 500, error_body(500, "internal error", "internal")
    status = http_status(exc.code)
    if isinstance(exc, ModelNotFound):
        return status, error_body(status, f"model: the model `{exc.requested}` does not exist; "
                                  f"this server serves `{exc.served}`", "model_not_found", "model")
    name = getattr(exc, "field", None)
    if not isinstance(name, str):
        return status, error_body(status, str(exc), exc.code.lower())
    param = rename(name) if rename is not None else name
    reason = exc.reason if isinstance(exc, InvalidArgument) else str(exc)
    return status, error_body(status, f"{param}: {reason}", exc.code.lower(), param)


# --- requests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenAIRequest:
    """A parsed ``/v1/completions`` or ``/v1/chat/completions`` body.

    ``top_logprobs``: None = no logprobs in the response; k = each token's logprob and its k
    best alternatives. ``renames``: our field prefix -> the client's, longest first."""

    kind: str
    requests: list[generation_pb2.GenerateRequest]
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None
    batch: bool = False
    renames: tuple[tuple[str, str], ...] = ()

    @property
    def n(self) -> int:
        params = self.requests[0].params
        return params.n if params.HasField("n") else 1

    def param_name(self, name: str, prompt_index: int = 0) -> str:
        """The client's name for our field ``name`` of prompt ``prompt_index``."""
        prompt = f"prompt[{prompt_index}]" if self.batch else "prompt"
        renames = self.renames + (
            (("prompt.chat.messages", "messages"), ("prompt.chat", "messages"),
             ("prompt", "messages")) if self.kind == CHAT else
            (("prompt.text", prompt), ("prompt.token_ids", prompt), ("prompt", prompt)))
        for ours, theirs in renames:
            if name == ours or (name.startswith(ours) and name[len(ours)] in ".["):
                rest = name[len(ours):]
                return (theirs + rest) if theirs else rest.lstrip(".")
        return name


def parse_completion_request(body: Any, request_id: str) -> OpenAIRequest:
    """Raises ``InvalidArgument`` naming the client's field."""
    body = _object(body)
    _refuse_unsupported(body, COMPLETION)
    params, top_logprobs, renames = _sampling_params(body, COMPLETION)
    prompts, batch = _prompts(body.get("prompt"))
    requests = []
    for i, prompt in enumerate(prompts):
        request = generation_pb2.GenerateRequest(
            request_id=f"{request_id}-{i}" if batch and request_id else request_id,
            model=_model(body), params=params, cache_salt=_cache_salt(body))
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        requests.append(request)
    stream, include_usage = _stream(body)
    return OpenAIRequest(COMPLETION, requests, stream, include_usage, top_logprobs, batch,
                         renames)


def parse_chat_request(body: Any, request_id: str) -> OpenAIRequest:
    """Raises ``InvalidArgument`` naming the client's field."""
    body = _object(body)
    _refuse_unsupported(body, CHAT)
    params, top_logprobs, renames = _sampling_params(body, CHAT)
    request = generation_pb2.GenerateRequest(
        request_id=request_id, model=_model(body), params=params, cache_salt=_cache_salt(body),
        chat=parse_messages(body.get("messages")))
    stream, include_usage = _stream(body)
    return OpenAIRequest(CHAT, [request], stream, include_usage, top_logprobs, False, renames)


def parse_messages(value: Any) -> generation_pb2.ChatMessages:
    """OpenAI chat messages: ``content`` is a string, a list of text parts, or null."""
    if not isinstance(value, list):
        raise InvalidArgument("messages", "must be a list of {role, content} objects")
    chat = generation_pb2.ChatMessages()
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise InvalidArgument(f"messages[{i}]", "must be an object with role and content")
        role = message.get("role")
        if not isinstance(role, str):
            raise InvalidArgument(f"messages[{i}].role", "must be a string")
        chat.messages.add(role=role, content=_content(message.get("content"), i))
    return chat


def _content(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidArgument(f"messages[{i}].content", "must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise InvalidArgument(f"messages[{i}].content[{j}]",
                                  "only text parts ({\"type\": \"text\", ...}) are supported")
        texts.append(_typed(part, "text", str, "a string", f"messages[{i}].content[{j}].text")
                     or "")
    return "\n".join(texts)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    return _typed(body, "model", str, "a string") or ""


def _cache_salt(body: dict[str, Any]) -> str:
    return _typed(body, "cache_salt", str, "a string") or ""


def _prompts(prompt: Any) -> tuple[list[str | list[int]], bool]:
    """``(prompts, batch)``: one string or id list, or a batch of either."""
    what = "a string, a list of token ids, or a list of strings or of token id lists"
    if isinstance(prompt, str):
        return [prompt], False
    if not isinstance(prompt, list):
        raise InvalidArgument("prompt", f"must be {what}")
    if not prompt:
        raise InvalidArgument("prompt", "must not be empty")
    if all(_is_int(t) for t in prompt):
        return [list(prompt)], False
    if len(prompt) > MAX_BATCH_PROMPTS:
        raise InvalidArgument("prompt", f"at most {MAX_BATCH_PROMPTS} prompts in one request")
    prompts: list[str | list[int]] = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            prompts.append(item)
        elif isinstance(item, list) and all(_is_int(t) for t in item):
            prompts.append(list(item))
        else:
            raise InvalidArgument(f"prompt[{i}]", "must be a string or a list of token ids")
    return prompts, True


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = bool(_typed(body, "stream", bool, "true or false"))
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise InvalidArgument("stream_options", "only allowed with \"stream\": true")
    if not isinstance(options, dict):
        raise InvalidArgument("stream_options", "must be an object")
    usage = _typed(options, "include_usage", bool, "true or false", "stream_options.include_usage")
    return stream, bool(usage)


def _refuse_unsupported(body: dict[str, Any], kind: str) -> None:
    """Fields that would change the answer and are not supported: refused, not ignored."""
    refused = {"echo": body.get("echo") is True,
               "suffix": bool(body.get("suffix")),
               "logit_bias": bool(body.get("logit_bias")),
               "tools": bool(body.get("tools")),
               "functions": bool(body.get("functions")),
               "tool_choice": body.get("tool_choice") not in (None, "none"),
               "response_format": (body.get("response_format") or {"type": "text"}) != {
                   "type": "text"}}
    for name, bad in refused.items():
        if bad:
            raise InvalidArgument(name, "is not supported by this server")
    if kind == CHAT and "prompt" in body:
        raise InvalidArgument("prompt", "chat completions take messages; use /v1/completions")


_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "length_penalty")
_INTS = ("top_k", "min_tokens", "n", "best_of")
_BOOLS = ("ignore_eos", "early_stopping", "include_stop_str_in_output")


def _sampling_params(
    body: dict[str, Any], kind: str
) -> tuple[common_pb2.SamplingParams, int | None, tuple[tuple[str, str], ...]]:
    """``(params, top_logprobs, renames)``; only what the client set is set, so the shared
    resolver applies pagedserve's defaults to the rest."""
    p = common_pb2.SamplingParams()
    max_name = "max_tokens"
    if kind == CHAT and body.get("max_completion_tokens") is not None:
        max_name = "max_completion_tokens"
    max_tokens = _integer(body, max_name)
    if max_tokens is None and kind == COMPLETION:
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS
    if max_tokens is not None:
        p.max_tokens = max_tokens
    for name in _FLOATS:
        value = _number(body, name)
        if value is not None:
            setattr(p, name, value)
    for name in _INTS:
        value = _integer(body, name)
        if value is not None:
            setattr(p, name, value)
    for name in _BOOLS:
        setattr(p, name, bool(_typed(body, name, bool, "true or false")))
    seed = _integer(body, "seed")
    if seed is not None:
        if not 0 <= seed < 2**64:
            raise InvalidArgument("seed", f"must be in [0, 2^64), got {seed}")
        p.seed = seed
    p.stop.extend(_stops(body.get("stop")))
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
            raise InvalidArgument("stop_token_ids", "must be a list of token ids")
        p.stop_token_ids.extend(stop_ids)
    renames = [("params.max_tokens", max_name), ("request_id", "X-Request-Id")]
    if _typed(body, "use_beam_search", bool, "true or false"):
        # vLLM's legacy spelling: the beam width is best_of, else n.
        width_name = "best_of" if p.HasField("best_of") else "n"
        p.beam_width = p.best_of if p.HasField("best_of") else (p.n if p.HasField("n") else 1)
        p.ClearField("best_of")
        renames.append(("params.beam_width", width_name))
    top_logprobs = _logprobs(body, kind, p)
    renames.append(("params.logprobs", "top_logprobs" if kind == CHAT else "logprobs"))
    renames.append(("params", ""))
    return p, top_logprobs, tuple(renames)


def _logprobs(body: dict[str, Any], kind: str, p: common_pb2.SamplingParams) -> int | None:
    """How many top logprobs the response shows. The scheduler sends logprobs only when asked
    for at least one alternative, so 0 asks for 1 and shows none."""
    if kind == COMPLETION:
        top = _integer(body, "logprobs")
    else:
        wanted = _typed(body, "logprobs", bool, "true or false")
        top = _integer(body, "top_logprobs")
        if top is not None and not wanted:
            raise InvalidArgument("top_logprobs", "needs \"logprobs\": true")
        if wanted and top is None:
            top = 0
    if top is not None:
        p.logprobs = top or 1
    return top


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise InvalidArgument("stop", "must be a string or a list of strings")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _typed(body: dict[str, Any], name: str, kind: type, what: str, label: str = "") -> Any:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidArgument(label or name, f"must be {what}")
    return value


def _integer(body: dict[str, Any], name: str) -> int | None:
    return _typed(body, name, int, "an integer")  # type: ignore[no-any-return]


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(name, "must be a number")
    return float(value)


# --- responses ------------------------------------------------------------------------------------


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    text_offset: int = 0  # completions' logprobs: characters of text before the next token


class ResponseBuilder:
    """Builds one request's OpenAI response (or chunks) from its prompts' messages."""

    def __init__(self, parsed: OpenAIRequest, response_id: str, model: str, created: int,
                 tokenizer: Tokenizer) -> None:
        self.parsed = parsed
        self._id = ("chatcmpl-" if parsed.kind == CHAT else "cmpl-") + response_id
        self._object = "chat.completion" if parsed.kind == CHAT else "text_completion"
        self._model = model
        self._created = created
        self._tokenizer = tokenizer
        self._n = parsed.n
        self._choices = [_Choice() for _ in range(self._n * len(parsed.requests))]
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._cached_tokens = [0] * len(parsed.requests)

    def set_prompt_tokens(self, counts: Sequence[int]) -> None:
        self._prompt_tokens = sum(counts)

    # streaming ---------------------------------------------------------------------------------

    def first_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open each choice with the assistant's role, before any token."""
        if self.parsed.kind != CHAT:
            return []
        return [self._chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None})
                for i in range(len(self._choices))]

    def chunk(self, prompt_index: int,
              message: generation_pb2.GenerateResponse) -> dict[str, Any] | None:
        """The chunk for one message (None when it carries nothing to show)."""
        index, choice = self._account(prompt_index, message)
        logprobs = self._logprobs(choice, message.logprobs)
        if not message.text and choice.finish_reason is None and logprobs is None:
            return None  # e.g. a token that ends mid-character: its text comes later
        body: dict[str, Any] = {"index": index}
        if self.parsed.kind == CHAT:
            body["delta"] = {"content": message.text} if message.text else {}
        else:
            body["text"] = message.text
        body.update(logprobs=logprobs, finish_reason=choice.finish_reason)
        return self._chunk(body)

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
        chunk = self._envelope(self._object + ("" if self.parsed.kind != CHAT else ".chunk"))
        chunk.update(choices=[], usage=self.usage())
        return chunk

    # whole response ----------------------------------------------------------------------------

    def add(self, prompt_index: int, message: generation_pb2.GenerateResponse) -> None:
        _, choice = self._account(prompt_index, message)
        choice.text.append(message.text)
        choice.logprobs.extend(message.logprobs)

    def response(self) -> dict[str, Any]:
        choices = []
        for index, choice in enumerate(self._choices):
            text = "".join(choice.text)
            logprobs = self._logprobs(choice, choice.logprobs)
            if self.parsed.kind == CHAT:
                choices.append({"index": index,
                                "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": choice.finish_reason})
            else:
                choices.append({"index": index, "text": text, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason})
        body = self._envelope(self._object)
        body.update(choices=choices, usage=self.usage())
        return body

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self._prompt_tokens,
                "completion_tokens": self._completion_tokens,
                "total_tokens": self._prompt_tokens + self._completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(self._cached_tokens)}}

    # internal ----------------------------------------------------------------------------------

    def _account(self, prompt_index: int,
                 message: generation_pb2.GenerateResponse) -> tuple[int, _Choice]:
        index = prompt_index * self._n + message.index
        choice = self._choices[index]
        if message.finish_reason:
            choice.finish_reason = FINISH_REASONS.get(message.finish_reason, "stop")
        if message.HasField("usage"):
            self._completion_tokens += message.usage.completion_tokens
            self._cached_tokens[prompt_index] = max(self._cached_tokens[prompt_index],
                                                    message.usage.cached_tokens)
        return index, choice

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self._id, "object": kind, "created": self._created, "model": self._model}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = self._envelope(self._object + (".chunk" if self.parsed.kind == CHAT else ""))
        chunk["choices"] = [choice]
        if self.parsed.include_usage:
            chunk["usage"] = None
        return chunk

    def _logprobs(self, choice: _Choice,
                  entries: Sequence[common_pb2.TokenLogprobs]) -> dict[str, Any] | None:
        top = self.parsed.top_logprobs
        if top is None or not entries:
            return None
        if self.parsed.kind == CHAT:
            return {"content": [self._chat_logprob(e, top) for e in entries]}
        tokens, offsets = [], []
        for e in entries:
            token = self._token(e.token_id)
            tokens.append(token)
            offsets.append(choice.text_offset)
            choice.text_offset += len(token)
        return {"tokens": tokens,
                "token_logprobs": [_logprob(e.logprob) for e in entries],
                "top_logprobs": [{self._token(t.token_id): _logprob(t.logprob)
                                  for t in e.top[:top]} for e in entries],
                "text_offset": offsets}

    def _chat_logprob(self, entry: common_pb2.TokenLogprobs, top: int) -> dict[str, Any]:
        token = self._token(entry.token_id)
        return {"token": token, "logprob": _logprob(entry.logprob),
                "bytes": list(token.encode()),
                "top_logprobs": [{"token": (t := self._token(alt.token_id)),
                                  "logprob": _logprob(alt.logprob), "bytes": list(t.encode())}
                                 for alt in entry.top[:top]]}

    def _token(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB
