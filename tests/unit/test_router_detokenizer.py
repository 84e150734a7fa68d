"""Incremental detokenization and stop strings."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.core.models import default_model_path
from router.detokenizer import IncrementalDetokenizer, StopStringMatcher
from router.tokenizer import Tokenizer, load_tokenizer

pytestmark = pytest.mark.external  # a service binary, the packaged model or a subprocess

_TOKENIZER: Tokenizer | None = None


def smollm2() -> Tokenizer:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = load_tokenizer(default_model_path())
    return _TOKENIZER


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return smollm2()


VOCAB_SIZE = 49152
# Single-byte tokens (ids 17..272 in SmolLM2) make split UTF-8 characters likely.
token_id = st.one_of(st.integers(0, VOCAB_SIZE - 1), st.integers(17, 272))


def stream(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> list[str]:
    return [detok.add(chunk) for chunk in chunks] + [detok.flush()]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ids=st.lists(token_id, min_size=1, max_size=24),
    cuts=st.lists(st.integers(1, 4), min_size=24, max_size=24),
    skip_special_tokens=st.booleans(),
)
def test_concatenated_deltas_equal_full_decode(
    ids: list[int], cuts: list[int], skip_special_tokens: bool
) -> None:
    tokenizer = smollm2()
    chunks, start = [], 0
    for size in cuts:
        if start >= len(ids):
            break
        chunks.append(ids[start : start + size])
        start += size
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = stream(detok, chunks)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any(d.endswith("\ufffd") for d in deltas[:-1])  # no half characters mid-stream


def test_multibyte_character_split_across_tokens_is_held_until_complete(
    tokenizer: Tokenizer,
) -> None:
    ids = tokenizer.encode("a 👋")
    assert len(ids) >= 3  # the emoji spans several byte tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([i]) for i in ids]
    assert deltas[0] == "a"
    assert deltas[-1].endswith("👋") and all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == "a 👋"


def test_special_tokens_are_skipped_or_kept(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hi<|im_end|>")
    skipped = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    kept = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert "".join(stream(skipped, [[i] for i in ids])) == "Hi"
    assert "".join(stream(kept, [[i] for i in ids])) == "Hi<|im_end|>"


def test_flush_emits_a_dangling_partial_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("👋")[:1]
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(ids) == ""
    assert detok.flush() == tokenizer.decode(ids) == "\ufffd"


# --- stop strings ---------------------------------------------------------------------------------


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> tuple[str, bool, int]:
    """Feeds pieces until a stop; returns (emitted text, stopped, pieces consumed)."""
    out = []
    for n, piece in enumerate(pieces, 1):
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True, n
    return "".join(out) + matcher.flush(), False, len(pieces)


def test_stop_string_split_across_deltas_truncates_before_it() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("hello S") == ("hello ", False)  # "S" held: may start "STOP"
    assert matcher.feed("TO") == ("", False)
    assert matcher.feed("P and more") == ("", True)


def test_include_stop_str_in_output_keeps_the_stop_string() -> None:
    text, stopped, _ = feed_all(StopStringMatcher(["\n\n"], include_stop_in_output=True),
                                ["a\n", "\nb"])
    assert (text, stopped) == ("a\n\n", True)


def test_text_that_stops_matching_is_released() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("ST") == ("", False)
    assert matcher.feed("ART") == ("START", False)
    assert matcher.flush() == ""


def test_first_stop_string_to_end_wins_among_several() -> None:
    text, stopped, _ = feed_all(StopStringMatcher(["abc", "b"]), ["xabc"])
    assert (text, stopped) == ("xa", True)
    text, stopped, _ = feed_all(StopStringMatcher(["world", "o w"]), ["hello", " world"])
    assert (text, stopped) == ("hell", True)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abcST P\n", max_size=40),
    stops=st.lists(st.text(alphabet="abcST P\n", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    include=st.booleans(),
)
def test_stop_result_does_not_depend_on_how_text_is_split(
    text: str, stops: list[str], cuts: list[int], include: bool
) -> None:
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in pairwise(bounds)]
    chunked = feed_all(StopStringMatcher(stops, include_stop_in_output=include), pieces)[:2]
    by_char = feed_all(StopStringMatcher(stops, include_stop_in_output=include), list(text))[:2]
    assert chunked == by_char
    emitted, stopped = chunked
    ends = [text.find(s) + len(s) for s in stops if s in text]
    if ends:
        first_end = min(ends)
        assert stopped and text.startswith(emitted)
        assert len(emitted) <= first_end and (not include or len(emitted) == first_end)
    else:
        assert (emitted, stopped) == (text, False)


def test_can_stop_false_defers_matching_without_losing_text() -> None:
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("axb", can_stop=False) == ("axb", False)
    assert matcher.feed("cxd") == ("c", True)
