"""``WorkerMirror``: what one worker knows of the scheduler's sequences, and what it must hear next.

The scheduler's domain objects (``Sequence``, block tables) say what *is*; a mirror says what the
worker *has been told*, so each step carries only the difference (``scheduler.step_builder``).
It is the one outbox of a worker's step: sequences to forget (``dropped_seq_ids``) and blocks
published to the prefix cache (``cached``) wait here until the next step carries them.

Only ``step_builder.commit`` advances the per-sequence entries; releasing a sequence
(``forget``) is the one other change, made wherever the scheduler frees it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SeqOnWorker:
    """One sequence as the worker holds it after the last committed step."""

    num_tokens: int  # its tokens, including the sample it appends itself
    num_blocks: int  # block-table entries
    table_version: int  # ``Sequence.num_table_rewrites`` when its table was last sent


class WorkerMirror:
    """Invariant: ``seqs`` holds exactly the sequences registered on the worker and not yet named
    in a step's ``finished_seq_ids`` (or waiting in ``dropped_seq_ids`` to be)."""

    def __init__(self) -> None:
        self.seqs: dict[int, SeqOnWorker] = {}
        self.dropped_seq_ids: list[int] = []
        self.cached: list[tuple[int, bytes]] = []  # (block id, hash), for ``WorkerStep.cached``

    def forget(self, seq_id: int) -> None:
        """The worker must drop ``seq_id`` with the next step, if it holds it."""
        if self.seqs.pop(seq_id, None) is not None:
            self.dropped_seq_ids.append(seq_id)

    @property
    def has_news(self) -> bool:
        """Whether the worker must hear something even when nothing is scheduled."""
        return bool(self.dropped_seq_ids)
