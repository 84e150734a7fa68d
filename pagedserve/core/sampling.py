"""Sampling parameters: defaults and validation, in one place for every entry point.

``resolve_sampling_params`` turns what a client sent into what the scheduler and workers run: a copy
with every optional field set (except ``seed`` and ``logprobs``, whose absence means "random" and
"no logprobs") and every range checked. Invariant: resolving an already resolved message returns an
equal message, so downstream services may re-check without changing anything. Nothing here imports
grpc; failures raise ``InvalidArgument`` naming the field (``params.top_p``).

One home for each convention the services share:

- **Defaults** (``DEFAULTS``, ``TOP_K_DISABLED``): what an unset field means. The router fills
  them in; a worker handed a message that was never resolved reads the same table
  (``param_or_default``).
- **The stop set.** Resolved with the model's EOS ids, ``stop_token_ids`` lists every token that
  ends an output: the client's stop ids, then the EOS ids unless ``ignore_eos``. It is computed
  here, once, where the request is resolved, and carried in the message: the scheduler's stop
  check, beam search, the worker's ``min_tokens`` suppression and the router's "the stop token is
  not part of the text" all read ``stop_token_ids`` and nothing else.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import Any

from pagedserve.core.errors import InvalidArgument
from pagedserve.core.token_ids import check_token_ids
from protos.pagedserve.v1 import common_pb2

DEFAULT_MAX_TOKENS = 256
MAX_LOGPROBS = 20
MAX_N = 64
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
PENALTY_RANGE = (-2.0, 2.0)
# Ranges that keep every step's math finite in fp32 (logits of a few hundred at most): a logit
# divided by the smallest temperature or repetition penalty, or multiplied by the largest, stays
# far below fp32's 3.4e38, and ``generated_len ** length_penalty`` stays a finite, non-zero
# double for any context length. Temperatures below MIN_TEMPERATURE (but above 0) are refused
# rather than silently made greedy.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0
REPETITION_PENALTY_RANGE = (1e-2, 100.0)
LENGTH_PENALTY_RANGE = (-10.0, 10.0)

TOP_K_DISABLED = -1  # the one spelling of "no top-k" after resolution (the proto also takes 0)

_FLOAT_DEFAULTS = {"top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
                   "presence_penalty": 0.0, "frequency_penalty": 0.0, "length_penalty": 1.0}

# What an unset field means (common.proto). ``temperature`` is 1.0 except with beam search, where
# resolution makes it 0; ``logprobs`` unset means none (0).
DEFAULTS: Mapping[str, float | int] = MappingProxyType({
    "temperature": 1.0, "top_k": TOP_K_DISABLED, **_FLOAT_DEFAULTS,
    "min_tokens": 0, "logprobs": 0,
})


def param_or_default(params: common_pb2.SamplingParams, name: str) -> float | int:
    """``params.<name>`` if set, else its default from ``DEFAULTS``; a ``top_k`` of 0 reads as
    ``TOP_K_DISABLED``."""
    if not params.HasField(name):
        return DEFAULTS[name]
    value: float | int = getattr(params, name)
    if name == "top_k" and value == 0:
        return TOP_K_DISABLED
    return value


def make_sampling_params(**kwargs: Any) -> common_pb2.SamplingParams:
    """Builds a ``SamplingParams`` from keyword arguments named as the proto fields.

    ``stop`` may be one string. Unknown names raise ``TypeError``; ranges are checked later by
    ``resolve_sampling_params``."""
    fields = common_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(unknown)}")
    if isinstance(kwargs.get("stop"), str):
        kwargs["stop"] = [kwargs["stop"]]
    return common_pb2.SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})


def resolve_sampling_params(
    params: common_pb2.SamplingParams,
    *,
    num_prompt_tokens: int,
    max_model_len: int,
    max_tokens_limit: int,
    vocab_size: int | None = None,
    eos_token_ids: Collection[int] = (),
) -> common_pb2.SamplingParams:
    """Returns a validated copy of ``params`` with defaults filled in; ``params`` is not changed.

    ``max_tokens`` defaults to ``DEFAULT_MAX_TOKENS`` clipped to what the context and the limit
    leave after the prompt. ``eos_token_ids`` (the model's) join ``stop_token_ids`` unless
    ``ignore_eos``: the resolved ``stop_token_ids`` is the request's whole stop set (see the module
    doc). Raises ``InvalidArgument`` naming the first bad field."""
    out = common_pb2.SamplingParams()
    out.CopyFrom(params)
    _check_finite(out)
    _resolve_length(out, num_prompt_tokens, max_model_len, max_tokens_limit)
    _resolve_sampling(out)
    _resolve_penalties(out)
    _resolve_counts(out)
    _resolve_stops(out, vocab_size, eos_token_ids)
    if out.beam_width > 1:
        _check_beam_search(out)
    out.skip_special_tokens = True  # proto3 bool cannot say "unset"; the router's default wins
    return out


# --- internal helpers, one concern each -----------------------------------------------------------


def _fail(name: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"params.{name}", message)


def _within(value: float, low: float, high: float) -> bool:
    """``low <= value <= high`` with the bounds rounded as the proto's fp32 fields round them
    (so ``0.01`` sent by a client is inside ``[0.01, ...]``)."""
    return _as_float32(low) <= value <= _as_float32(high)


def _as_float32(value: float) -> float:
    result: float = struct.unpack("f", struct.pack("f", value))[0]
    return result


def _check_finite(p: common_pb2.SamplingParams) -> None:
    for name in ("temperature", *_FLOAT_DEFAULTS):
        if p.HasField(name) and not math.isfinite(getattr(p, name)):
            raise _fail(name, "must be a finite number")


def _resolve_length(
    p: common_pb2.SamplingParams, num_prompt_tokens: int, max_model_len: int, max_tokens_limit: int
) -> None:
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise InvalidArgument(
            "prompt", f"{num_prompt_tokens} prompt tokens leave no room in the "
            f"{max_model_len}-token context; shorten the prompt"
        )
    if not p.HasField("max_tokens"):
        p.max_tokens = min(DEFAULT_MAX_TOKENS, room, max_tokens_limit)
    if p.max_tokens < 1:
        raise _fail("max_tokens", f"must be at least 1, got {p.max_tokens}")
    if p.max_tokens > max_tokens_limit:
        raise _fail("max_tokens", f"must be at most {max_tokens_limit}, got {p.max_tokens}")
    if p.max_tokens > room:
        raise _fail("max_tokens", f"{num_prompt_tokens} prompt tokens + {p.max_tokens} exceed "
                    f"the {max_model_len}-token context; ask for at most {room}")
    if not p.HasField("min_tokens"):
        p.min_tokens = 0
    if not 0 <= p.min_tokens <= p.max_tokens:
        raise _fail("min_tokens", f"must be in [0, max_tokens={p.max_tokens}], got {p.min_tokens}")


def _resolve_sampling(p: common_pb2.SamplingParams) -> None:
    if not p.HasField("temperature"):
        p.temperature = 0.0 if p.beam_width > 1 else DEFAULTS["temperature"]
    if p.temperature < 0:
        raise _fail("temperature", f"must be >= 0 (0 = greedy), got {p.temperature}")
    if p.temperature != 0 and not _within(p.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE):
        raise _fail("temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                    f"{MAX_TEMPERATURE:g}], got {p.temperature:g}")
    for name, value in _FLOAT_DEFAULTS.items():
        if not p.HasField(name):
            setattr(p, name, value)
    if not 0 < p.top_p <= 1:
        raise _fail("top_p", f"must be in (0, 1], got {p.top_p}")
    p.top_k = int(param_or_default(p, "top_k"))  # 0 and -1 both mean "disabled": one spelling
    if p.top_k < TOP_K_DISABLED:
        raise _fail("top_k", f"must be -1 (disabled) or >= 1, got {p.top_k}")
    if not 0 <= p.min_p <= 1:
        raise _fail("min_p", f"must be in [0, 1], got {p.min_p}")


def _resolve_penalties(p: common_pb2.SamplingParams) -> None:
    low, high = REPETITION_PENALTY_RANGE
    if not _within(p.repetition_penalty, low, high):
        raise _fail("repetition_penalty", f"must be in [{low:g}, {high:g}] (1 = off), got "
                    f"{p.repetition_penalty:g}")
    low, high = LENGTH_PENALTY_RANGE
    if not _within(p.length_penalty, low, high):
        raise _fail("length_penalty", f"must be in [{low:g}, {high:g}], got {p.length_penalty:g}")
    low, high = PENALTY_RANGE
    for name in ("presence_penalty", "frequency_penalty"):
        if not low <= getattr(p, name) <= high:
            raise _fail(name, f"must be in [{low:g}, {high:g}], got {getattr(p, name)}")


def _resolve_counts(p: common_pb2.SamplingParams) -> None:
    if p.HasField("logprobs") and not 0 <= p.logprobs <= MAX_LOGPROBS:
        raise _fail("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {p.logprobs}")
    if not p.HasField("n"):
        p.n = 1
    if not 1 <= p.n <= MAX_N:
        raise _fail("n", f"must be in [1, {MAX_N}], got {p.n}")
    if not p.HasField("beam_width"):
        p.beam_width = 1
    if p.beam_width < 1:
        raise _fail("beam_width", f"must be >= 1 (1 = no beam search), got {p.beam_width}")
    if p.beam_width > 1 and p.n > p.beam_width:
        raise _fail("n", f"must be <= beam_width={p.beam_width}, got {p.n}")
    if not p.HasField("best_of"):
        p.best_of = p.beam_width if p.beam_width > 1 else p.n
    if p.best_of < p.n:
        raise _fail("best_of", f"must be >= n={p.n}, got {p.best_of}")
    if p.best_of > MAX_N:
        raise _fail("best_of", f"must be at most {MAX_N}, got {p.best_of}")
    if p.beam_width == 1 and p.temperature == 0 and p.best_of > 1:
        name = "n" if p.n > 1 else "best_of"
        raise _fail(name, "greedy sampling (temperature 0) gives one answer; set temperature > 0")


def _resolve_stops(p: common_pb2.SamplingParams, vocab_size: int | None,
                   eos_token_ids: Collection[int]) -> None:
    if len(p.stop) > MAX_STOP_STRINGS:
        raise _fail("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(p.stop)}")
    for i, stop in enumerate(p.stop):
        if not stop or len(stop) > MAX_STOP_STRING_CHARS:
            raise _fail(f"stop[{i}]", f"must be 1 to {MAX_STOP_STRING_CHARS} characters")
    check_token_ids(p.stop_token_ids, vocab_size, "params.stop_token_ids")
    if not p.ignore_eos:  # the stop set, once: EOS joins the client's ids (idempotent)
        present = set(p.stop_token_ids)
        p.stop_token_ids.extend([t for t in dict.fromkeys(eos_token_ids) if t not in present])


def _check_beam_search(p: common_pb2.SamplingParams) -> None:
    """Beam search is deterministic: it ranks beams by cumulative logprob and samples nothing."""
    conflicts = (("temperature", p.temperature != 0, "must be 0 or unset with beam search"),
                 ("top_p", p.top_p != 1, "must be 1 or unset with beam search"),
                 ("top_k", p.top_k != TOP_K_DISABLED, "must be -1 or unset with beam search"),
                 ("min_p", p.min_p != 0, "must be 0 or unset with beam search"),
                 ("n", p.n > p.beam_width, f"must be <= beam_width={p.beam_width}"),
                 ("best_of", p.best_of != p.beam_width, "must equal beam_width or be unset"))
    for name, bad, message in conflicts:
        if bad:
            raise _fail(name, message)
