"""What the engine tells its observers (metrics, the stats line), as typed calls.

An observer is given to the ``Engine`` at construction and implements ``EngineObserver``; the
engine calls it on the event loop, after each placement, each worker step and each request's end.
``StepStats`` is the typed record of one step, including the worker's own forward and sampling
time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from scheduler.policy import StepPlan
    from scheduler.sequence import SequenceGroup


@dataclass(frozen=True, slots=True)
class StepStats:
    """One step of one worker. ``seconds`` is the engine's wall time for the whole step
    (schedule, the worker's step, processing its tokens); ``forward_seconds`` and
    ``sample_seconds`` are the worker's share as it reported them."""

    worker: str
    seconds: float
    forward_seconds: float
    sample_seconds: float
    plan: StepPlan
    num_generated_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.plan.num_tokens

    @property
    def preempted(self) -> list[tuple[SequenceGroup, str]]:
        return self.plan.preempted


class EngineObserver(Protocol):
    def on_placement(self, worker: str, reason: str) -> None: ...

    def on_step(self, stats: StepStats) -> None: ...

    def on_finished(self, group: SequenceGroup, error: BaseException | None) -> None: ...
