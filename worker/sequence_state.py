"""``SequenceState``: what a worker remembers about one sequence between steps.

What the worker knows of a sequence: token ids (from ``NewSeq.token_ids``, then its own samples,
or, for a sequence the scheduler appends to, ``ScheduledBatch.append_token_ids``), the prompt
length (for penalties), resolved sampling params and the block table.

Tokens live in a growable numpy buffer, so slicing out a step's new tokens or a penalty's prompt /
output spans is a view, not a Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from worker.sampler import ResolvedParams


class SequenceState:
    """Invariants: ``num_prompt_tokens <= num_tokens``; ``block_table`` maps logical block
    ``i`` (positions ``[i*block_size, (i+1)*block_size)``) to a physical device block."""

    def __init__(
        self,
        seq_id: int,
        token_ids: Sequence[int] | np.ndarray,
        num_prompt_tokens: int,
        params: ResolvedParams,
    ) -> None:
        self.seq_id = seq_id
        self.params = params
        self.num_prompt_tokens = num_prompt_tokens
        self.block_table: list[int] = []
        self.appends_samples = True  # False: the scheduler sends the tokens (beam search)
        self._buffer = np.zeros(max(16, 2 * len(token_ids)), dtype=np.int64)
        self.num_tokens = 0
        self.append(token_ids)

    @property
    def token_ids(self) -> np.ndarray:
        """A view of the tokens; valid until the next ``append``."""
        return self._buffer[: self.num_tokens]

    @property
    def prompt_ids(self) -> np.ndarray:
        return self._buffer[: self.num_prompt_tokens]

    def output_ids(self, end: int | None = None) -> np.ndarray:
        """Tokens after the prompt, up to ``end`` (default: all)."""
        return self._buffer[self.num_prompt_tokens : self.num_tokens if end is None else end]

    def append(self, token_ids: Sequence[int] | np.ndarray) -> None:
        count = len(token_ids)
        if self.num_tokens + count > self._buffer.shape[0]:
            grown = np.zeros(2 * (self.num_tokens + count), dtype=np.int64)
            grown[: self.num_tokens] = self.token_ids
            self._buffer = grown
        self._buffer[self.num_tokens : self.num_tokens + count] = token_ids
        self.num_tokens += count

    def append_one(self, token_id: int) -> None:
        if self.num_tokens == self._buffer.shape[0]:
            self.append([token_id])
            return
        self._buffer[self.num_tokens] = token_id
        self.num_tokens += 1

    def fork(self, seq_id: int, params: ResolvedParams, num_prompt_tokens: int) -> SequenceState:
        """A child with a copy of this sequence's tokens (not its block table: the scheduler sends
        the child's table)."""
        return SequenceState(seq_id, self.token_ids.copy(), num_prompt_tokens, params)
