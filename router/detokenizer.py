"""Token ids -> text, a few tokens at a time, and stop strings over the text stream.

``IncrementalDetokenizer`` uses the prefix/read-offset method: it decodes a short window of
recent ids twice (without and with the new ids) and emits the difference, holding back while the
window ends in U+FFFD (an incomplete UTF-8 character). ``tokenizers.decoders.DecodeStream`` does the
same in Rust but cannot flush: a sequence that really ends mid-character (or on a genuine U+FFFD)
would lose its tail. Invariant: the concatenation of every ``add`` and the final ``flush`` equals
``tokenizer.decode(all_ids)``.

``StopStringMatcher`` emits text as soon as it cannot be the start of a stop string, and stops at
the first stop string to *end* in the stream (what a character-by-character reader would see
first), so the result does not depend on how the text was split into deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Owns one output's token ids and the two offsets into them::

        ids:  [ ... emitted long ago ... | prefix_offset ... read_offset | new ids ... ]
                                           ^ window start     ^ text emitted up to here

    Both offsets sit on complete characters (they only move when the window's text does not
    end in U+FFFD), so decoding the window agrees with decoding everything."""

    def __init__(self, tokenizer: Decoder, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    @property
    def token_ids(self) -> list[int]:
        return self._token_ids

    def add(self, token_ids: Sequence[int]) -> str:
        """Appends ``token_ids``; returns the new text that is complete (may be empty)."""
        self._token_ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Returns whatever is held back (the output ended); the stream is complete after this."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._token_ids))
        if len(new_text) <= len(prefix_text) and not final:
            return ""
        if new_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        return new_text[len(prefix_text):]

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tokenizer.decode(
            self._token_ids[start:end], skip_special_tokens=self._skip_special_tokens
        )


class StopStringMatcher:
    """Owns the text held back because it could still begin a stop string.

    Invariant: the held text is the longest suffix of the stream that is a proper prefix of some
    stop string, so every stop occurrence not yet seen starts inside ``held + new text``."""

    def __init__(self, stops: Sequence[str], *, include_stop_in_output: bool = False) -> None:
        self._stops = tuple(s for s in stops if s)
        self._include = include_stop_in_output
        self._max_held = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""

    def feed(self, text: str, *, can_stop: bool = True) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string ended the stream).

        With ``can_stop`` false (``min_tokens`` not reached) stop strings are not matched yet."""
        buffer = self._held + text
        hit = self._first_stop(buffer) if can_stop else None
        if hit is not None:
            start, stop = hit
            self._held = ""
            return buffer[: start + len(stop) if self._include else start], True
        held_len = self._held_len(buffer)
        self._held = buffer[len(buffer) - held_len:]
        return buffer[: len(buffer) - held_len], False

    def flush(self) -> str:
        """Returns the held text (the stream ended without a stop string)."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, buffer: str) -> tuple[int, str] | None:
        """The stop string that ends first in ``buffer`` (ties: the one that starts first)."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = buffer.find(stop)
            if start >= 0:
                key = (start + len(stop), start, stop)
                best = key if best is None or key < best else best
        return None if best is None else (best[1], best[2])

    def _held_len(self, buffer: str) -> int:
        for size in range(min(self._max_held, len(buffer)), 0, -1):
            suffix = buffer[-size:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return size
        return 0
