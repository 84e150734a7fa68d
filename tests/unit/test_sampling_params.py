"""Sampling parameter defaults and validation: each bad field is refused by name."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.core.errors import InvalidArgument
from pagedserve.core.sampling import (
    DEFAULT_MAX_TOKENS,
    DEFAULTS,
    TOP_K_DISABLED,
    make_sampling_params,
    param_or_default,
    resolve_sampling_params,
)
from protos.pagedserve.v1 import common_pb2

LIMITS = {"num_prompt_tokens": 10, "max_model_len": 1000, "max_tokens_limit": 512}


def resolve(**kwargs: object) -> common_pb2.SamplingParams:
    return resolve_sampling_params(make_sampling_params(**kwargs), **LIMITS)  # type: ignore[arg-type]


def test_defaults_fill_every_optional_field_except_seed_and_logprobs() -> None:
    p = resolve()
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, -1, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.n, p.best_of, p.beam_width) == (
        DEFAULT_MAX_TOKENS, 0, 1, 1, 1)
    assert p.length_penalty == 1.0 and p.skip_special_tokens
    assert not p.HasField("seed") and not p.HasField("logprobs")


def test_input_is_not_modified() -> None:
    params = make_sampling_params(temperature=0.5)
    resolve_sampling_params(params, **LIMITS)  # type: ignore[arg-type]
    assert not params.HasField("max_tokens")


def test_default_max_tokens_is_clipped_to_the_context() -> None:
    p = resolve_sampling_params(common_pb2.SamplingParams(), num_prompt_tokens=990,
                                max_model_len=1000, max_tokens_limit=512)
    assert p.max_tokens == 10


def test_prompt_that_fills_the_context_is_refused_naming_the_prompt() -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve_sampling_params(common_pb2.SamplingParams(), num_prompt_tokens=1000,
                                max_model_len=1000, max_tokens_limit=512)
    assert info.value.field == "prompt"


def test_top_k_zero_means_disabled() -> None:
    assert resolve(top_k=0).top_k == -1


BAD = [
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": 513}),  # above the limit
    ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"max_tokens": 5, "min_tokens": 6}),
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": math.nan}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("top_k", {"top_k": -2}),
    ("min_p", {"min_p": -0.1}),
    ("min_p", {"min_p": 1.1}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("presence_penalty", {"presence_penalty": 2.5}),
    ("frequency_penalty", {"frequency_penalty": -2.5}),
    ("logprobs", {"logprobs": -1}),
    ("logprobs", {"logprobs": 21}),
    ("n", {"n": 0}),
    ("best_of", {"n": 3, "best_of": 2}),
    ("n", {"n": 2, "temperature": 0.0}),
    ("best_of", {"best_of": 2, "temperature": 0.0}),
    ("beam_width", {"beam_width": 0}),
    ("temperature", {"beam_width": 4, "temperature": 0.7}),
    ("top_p", {"beam_width": 4, "top_p": 0.9}),
    ("top_k", {"beam_width": 4, "top_k": 5}),
    ("n", {"beam_width": 2, "n": 3}),
    ("best_of", {"beam_width": 2, "best_of": 4}),
    ("stop[1]", {"stop": ["ok", ""]}),
    ("stop_token_ids[0]", {"stop_token_ids": [-1]}),
]


@pytest.mark.parametrize(("field", "kwargs"), BAD)
def test_bad_field_is_refused_by_name(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve(**kwargs)
    assert info.value.field == f"params.{field}"
    assert f"params.{field}" in str(info.value)


def test_prompt_plus_max_tokens_beyond_the_context_names_max_tokens() -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve_sampling_params(make_sampling_params(max_tokens=100), num_prompt_tokens=950,
                                max_model_len=1000, max_tokens_limit=512)
    assert info.value.field == "params.max_tokens"


def test_stop_token_ids_are_checked_against_the_vocabulary() -> None:
    with pytest.raises(InvalidArgument, match="stop_token_ids"):
        resolve_sampling_params(make_sampling_params(stop_token_ids=[5, 100]), vocab_size=100,
                                **LIMITS)  # type: ignore[arg-type]


def test_beam_search_defaults_are_deterministic() -> None:
    p = resolve(beam_width=4, n=2)
    assert (p.temperature, p.best_of, p.n, p.beam_width) == (0.0, 4, 2, 4)


def test_make_sampling_params_rejects_unknown_names_and_wraps_one_stop() -> None:
    with pytest.raises(TypeError, match="temprature"):
        make_sampling_params(temprature=0.5)
    assert list(make_sampling_params(stop="\n").stop) == ["\n"]


@settings(max_examples=150, deadline=None)
@given(
    temperature=st.one_of(st.none(), st.floats(0, 3)),
    top_p=st.one_of(st.none(), st.floats(0.01, 1)),
    top_k=st.one_of(st.none(), st.integers(-1, 100)),
    max_tokens=st.one_of(st.none(), st.integers(1, 512)),
    n=st.one_of(st.none(), st.integers(1, 4)),
    beam_width=st.one_of(st.none(), st.integers(1, 4)),
)
def test_resolving_twice_changes_nothing(**kwargs: object) -> None:
    try:
        once = resolve(**kwargs)
    except InvalidArgument:
        return
    assert resolve_sampling_params(once, **LIMITS) == once  # type: ignore[arg-type]


def test_the_stop_set_is_resolved_once_with_the_models_eos() -> None:
    p = resolve_sampling_params(make_sampling_params(stop_token_ids=[5, 9]),
                                eos_token_ids=[9, 2, 2], **LIMITS)  # type: ignore[arg-type]
    assert list(p.stop_token_ids) == [5, 9, 2]  # the client's ids, then EOS not already there
    again = resolve_sampling_params(p, eos_token_ids=[9, 2], **LIMITS)  # type: ignore[arg-type]
    assert again == p
    ignored = resolve_sampling_params(make_sampling_params(stop_token_ids=[5], ignore_eos=True),
                                      eos_token_ids=[2], **LIMITS)  # type: ignore[arg-type]
    assert list(ignored.stop_token_ids) == [5]


def test_defaults_have_one_home_that_unresolved_readers_share() -> None:
    unset = common_pb2.SamplingParams()
    assert {name: param_or_default(unset, name) for name in DEFAULTS} == dict(DEFAULTS)
    assert param_or_default(common_pb2.SamplingParams(top_k=0), "top_k") == TOP_K_DISABLED
    resolved = resolve()
    assert all(getattr(resolved, name) == value for name, value in DEFAULTS.items()
               if name != "logprobs")  # logprobs stays unset: "none"


@pytest.mark.parametrize(("field", "kwargs"), [
    ("temperature", {"temperature": 3.4e38}),
    ("temperature", {"temperature": 1e-38}),
    ("temperature", {"temperature": 100.5}),
    ("repetition_penalty", {"repetition_penalty": 3.4e38}),
    ("repetition_penalty", {"repetition_penalty": 1e-38}),
    ("length_penalty", {"beam_width": 2, "length_penalty": -2000.0}),
    ("length_penalty", {"beam_width": 2, "length_penalty": 3.4e38}),
    ("length_penalty", {"best_of": 2, "temperature": 1.0, "length_penalty": -3.4e38}),
])
def test_values_that_would_make_the_math_non_finite_are_refused(
        field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve(**kwargs)
    assert info.value.field == f"params.{field}"


def test_the_edges_of_the_numeric_ranges_are_accepted() -> None:
    for kwargs in ({"temperature": 0.01}, {"temperature": 100.0}, {"repetition_penalty": 0.01},
                   {"repetition_penalty": 100.0}, {"beam_width": 2, "length_penalty": -10.0},
                   {"beam_width": 2, "length_penalty": 10.0}):
        resolve(**kwargs)
