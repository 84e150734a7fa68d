"""Checks a ``GenerateRequest`` and turns it into what the scheduler runs: prompt ids + resolved
params.

Everything a client can get wrong is found here, before the scheduler sees the request, and raised
as ``InvalidArgument`` naming the field (``prompt.text``, ``params.top_p``); a model this router
does not serve as ``ModelNotFound`` (``NOT_FOUND``, field ``model``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from pagedserve.core.errors import InvalidArgument, ModelNotFound
from pagedserve.core.request_id import check_request_id
from pagedserve.core.sampling import resolve_sampling_params
from pagedserve.core.token_ids import check_token_ids
from protos.pagedserve.v1 import common_pb2, generation_pb2
from router.cache_salt import check_cache_salt
from router.tokenizer import Tokenizer

# What a request message may hold beside its prompt: params, stop strings, ids, chat structure.
REQUEST_OVERHEAD_BYTES = 1024 * 1024
MAX_TOKEN_ID_BYTES = 5  # an int32 token id as a protobuf varint, at most


@dataclass(frozen=True)
class PromptLimits:
    """How large a prompt the router takes, checked before the costly work: ``max_bytes`` of
    UTF-8 before tokenizing, ``max_tokens`` after (or at once, for token ids)."""

    max_bytes: int
    max_tokens: int

    @property
    def max_request_bytes(self) -> int:
        """The largest request message that may hold an acceptable prompt (the gRPC and HTTP
        servers refuse larger ones before parsing them)."""
        return (max(self.max_bytes, MAX_TOKEN_ID_BYTES * self.max_tokens)
                + REQUEST_OVERHEAD_BYTES)


@dataclass(frozen=True)
class ServedModel:
    """What the scheduler serves, learned once at start (``Scheduler.GetModelInfo``).

    ``max_num_tokens_per_request`` is what the largest worker's KV pool can ever hold (0 = no
    limit reported); a request beyond it could never run anywhere, so it is refused like a
    too-long one. Within it the scheduler places a request only on a worker whose pool holds it
    (and refuses, RESOURCE_EXHAUSTED, what parallel samples make too large for every pool).
    ``eos_token_ids`` are the model's: resolution adds them to each request's stop set."""

    name: str
    max_model_len: int
    vocab_size: int
    block_size: int
    eos_token_ids: tuple[int, ...] = ()
    max_num_tokens_per_request: int = 0

    @property
    def context_len(self) -> int:
        limits = [self.max_model_len, self.max_num_tokens_per_request]
        return min(n for n in limits if n > 0)


@dataclass(frozen=True)
class PreparedRequest:
    """What the scheduler runs. ``cache_salt``: the request's prefix-cache partition
    (``router/cache_salt.py``; empty = shared), set once the caller is known."""

    request_id: str
    prompt_token_ids: list[int]
    params: common_pb2.SamplingParams
    cache_salt: bytes = field(default=b"", repr=False)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def prepare_request(
    request: generation_pb2.GenerateRequest,
    tokenizer: Tokenizer,
    model: ServedModel,
    *,
    max_tokens_limit: int,
    limits: PromptLimits,
) -> PreparedRequest:
    """Validates ``request``; returns its request id (made if empty), prompt ids and params."""
    check_model(request.model, model)
    request_id = _request_id(request.request_id)
    check_cache_salt(request.cache_salt)
    prompt_ids = prompt_token_ids(request, tokenizer, model.vocab_size, limits)
    params = resolve_sampling_params(
        request.params, num_prompt_tokens=len(prompt_ids), max_model_len=model.context_len,
        max_tokens_limit=max_tokens_limit, vocab_size=model.vocab_size,
        eos_token_ids=model.eos_token_ids,
    )
    return PreparedRequest(request_id, prompt_ids, params)


def prompt_token_ids(
    request: generation_pb2.GenerateRequest | generation_pb2.TokenizeRequest,
    tokenizer: Tokenizer,
    vocab_size: int,
    limits: PromptLimits,
) -> list[int]:
    """The prompt's ids: ``text`` is tokenized as is, ``chat`` through the chat template,
    ``token_ids`` are checked against the vocabulary; each within ``limits``."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidArgument("prompt", "set one of prompt.text, prompt.chat, prompt.token_ids")
    if kind == "token_ids":
        _check_num_tokens(len(request.token_ids.ids), limits, "prompt.token_ids")
        return checked_token_ids(list(request.token_ids.ids), vocab_size)
    if kind == "text":
        if not request.text:
            raise InvalidArgument("prompt.text", "must not be empty")
        _check_bytes(len(request.text.encode()), limits, "prompt.text")
        ids = tokenizer.encode(request.text, add_special_tokens=True)
    else:
        messages = _chat_messages(request.chat, tokenizer)
        _check_bytes(sum(len(m["role"].encode()) + len(m["content"].encode())
                         for m in messages), limits, "prompt.chat.messages")
        ids = tokenizer.encode_chat(messages)
    _check_num_tokens(len(ids), limits, "prompt")
    return ids


def _check_bytes(num_bytes: int, limits: PromptLimits, field: str) -> None:
    if num_bytes > limits.max_bytes:
        raise InvalidArgument(field, f"{num_bytes} bytes exceed this router's limit of "
                              f"{limits.max_bytes} (--max-prompt-bytes)")


def _check_num_tokens(num_tokens: int, limits: PromptLimits, field: str) -> None:
    if num_tokens > limits.max_tokens:
        raise InvalidArgument(field, f"{num_tokens} tokens exceed this router's limit of "
                              f"{limits.max_tokens} (--max-prompt-tokens, or the context)")


def check_model(requested: str, model: ServedModel) -> None:
    """An empty name means the served model; any other name must be it."""
    if requested and requested != model.name:
        raise ModelNotFound(requested, model.name)


def _request_id(requested: str) -> str:
    check_request_id(requested)
    return requested or uuid.uuid4().hex


def _chat_messages(chat: generation_pb2.ChatMessages, tokenizer: Tokenizer) -> list[dict[str, str]]:
    if not tokenizer.has_chat_template:
        raise InvalidArgument("prompt.chat", "the model has no chat template; send prompt.text")
    if not chat.messages:
        raise InvalidArgument("prompt.chat.messages", "must not be empty")
    for i, message in enumerate(chat.messages):
        if not message.role:
            raise InvalidArgument(f"prompt.chat.messages[{i}].role", "must not be empty")
    return [{"role": m.role, "content": m.content} for m in chat.messages]


def checked_token_ids(token_ids: list[int], vocab_size: int,
                      field: str = "prompt.token_ids") -> list[int]:
    """``token_ids`` if it is non-empty and every id is in the vocabulary; else
    ``InvalidArgument`` naming ``field`` (or its bad element, ``field[i]``)."""
    if not token_ids:
        raise InvalidArgument(field, "must not be empty")
    check_token_ids(token_ids, vocab_size, field)
    return token_ids
