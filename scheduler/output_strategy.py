"""How a request's sampled tokens become its outputs: one small strategy per kind of request,
chosen once when the request is added (``strategy_for``), never branched on per token.

- ``StreamSamples``: ``n`` samples streamed token by token, each stopping on its own
  (``scheduler.stop.StopCriteria``: a stop token, EOS included, ``max_tokens`` or the context).
- ``BestOfSamples``: ``best_of > n`` samples run to the end like the above, then the ``n`` with the
  highest cumulative log-prob are handed over whole; nothing streams before.
- ``BeamOutputs``: beam search (``scheduler.beam_search``); the scheduler picks each step's tokens,
  forks and frees beams, and hands over the best hypotheses whole.

The engine core calls ``accept`` once per sampled token (the hot path: a few attribute reads and
one append) and, only for a request whose ``accept`` returned ``True`` in this step, ``end_step``
once after the step's tokens are all in.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Protocol

from pagedserve.core.step import SampledRow, TopPairs
from protos.pagedserve.v1 import common_pb2, scheduler_pb2
from scheduler.beam_search import BeamState
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus
from scheduler.stop import StopCriteria


class SeqHost(Protocol):
    """What a strategy may do to the sequences of its request (``EngineCore`` implements it)."""

    def release(self, seq: Sequence) -> None:
        """Frees ``seq``'s blocks; the worker forgets it with the next step."""

    def fork(self, parent: Sequence, index: int) -> Sequence:
        """A new running sequence sharing all of ``parent``'s blocks."""


class OutputStrategy(Protocol):
    """Turns one request's sampled tokens into outputs. ``logprobs`` and ``outputs`` hold what
    the request gained and its consumer has not taken yet: per-token log-prob records by output
    index, and whole outputs (beam search, ``best_of > n``). Sampled tokens that stream are
    appended to the group's sequences, where the consumer reads them."""

    logprobs: dict[int, list[common_pb2.TokenLogprobs]]
    outputs: list[scheduler_pb2.SeqOutput]

    def accept(self, seq: Sequence, token_id: int, logprob: float, top: TopPairs) -> bool:
        """One sampled token of ``seq``; ``True`` when ``end_step`` must run after this step."""

    def end_step(self, group: SequenceGroup, host: SeqHost) -> None:
        """Once per step after the tokens it asked for: frees what finished, forks what branched,
        and sets the finished statuses; the group is done when ``group.is_finished``."""


class _Pending:
    """The part of every strategy its consumer drains (see ``OutputStrategy``)."""

    __slots__ = ("logprobs", "outputs")

    def __init__(self) -> None:
        self.logprobs: dict[int, list[common_pb2.TokenLogprobs]] = {}
        self.outputs: list[scheduler_pb2.SeqOutput] = []


class StreamSamples(_Pending):
    """``n`` independent samples (n = 1: plain decoding); each sequence stops on its own."""

    __slots__ = ("num_logprobs", "stop", "stopped")

    def __init__(self, stop: StopCriteria, num_logprobs: int) -> None:
        super().__init__()
        self.stop = stop
        self.num_logprobs = num_logprobs
        self.stopped: list[Sequence] = []

    def accept(self, seq: Sequence, token_id: int, logprob: float, top: TopPairs) -> bool:
        tokens = seq.token_ids
        tokens.append(token_id)
        seq.cumulative_logprob += logprob
        if self.num_logprobs:
            self.logprobs.setdefault(seq.index, []).append(
                token_logprobs(token_id, logprob, top))
        stop = self.stop
        if len(tokens) >= stop.max_len or (token_id in stop.stop_ids
                                           and len(tokens) >= stop.min_len):
            status = stop.status(len(tokens), token_id)
            assert status is not None, "the condition above is the status's"
            seq.status = status
            self.stopped.append(seq)
            return True
        return False

    def end_step(self, group: SequenceGroup, host: SeqHost) -> None:
        for seq in self.stopped:
            host.release(seq)
        self.stopped = []


class BestOfSamples(StreamSamples):
    """``best_of`` samples run like ``StreamSamples`` without streaming; when the last one ends,
    the ``n`` with the highest cumulative log-prob become the outputs, whole."""

    __slots__ = ("n",)

    def __init__(self, stop: StopCriteria, n: int) -> None:
        super().__init__(stop, num_logprobs=0)
        self.n = n

    def end_step(self, group: SequenceGroup, host: SeqHost) -> None:
        super().end_step(group, host)
        if group.is_finished:
            best = sorted(group.seqs, key=lambda s: -s.cumulative_logprob)[: self.n]
            self.outputs.extend(
                whole_output(i, s.output_token_ids[s.num_streamed_tokens:],
                             s.status.finish_reason, s.cumulative_logprob, s)
                for i, s in enumerate(best))


class BeamOutputs(_Pending):
    """Beam search: a step's rows are collected, then ``BeamState.step`` picks the next beams;
    the first continuation of a beam reuses its sequence, each further one forks it (the fork
    copies the parent before the parent's own token is appended), beams without one are freed."""

    __slots__ = ("beam", "n", "rows")

    def __init__(self, beam: BeamState, n: int) -> None:
        super().__init__()
        self.beam = beam
        self.n = n
        self.rows: list[tuple[Sequence, SampledRow]] = []

    def accept(self, seq: Sequence, token_id: int, logprob: float, top: TopPairs) -> bool:
        self.rows.append((seq, SampledRow(seq.seq_id, token_id, logprob, top)))
        return True

    def end_step(self, group: SequenceGroup, host: SeqHost) -> None:
        rows, self.rows = self.rows, []
        order = {s.seq_id: i for i, s in enumerate(group.seqs)}
        rows.sort(key=lambda item: order[item[0].seq_id])
        beam = self.beam
        running = beam.step(rows)
        if beam.done:
            self._finish(group, host)
            return
        carriers: list[Sequence] = []
        used: set[int] = set()
        for cont in running:
            if cont.parent.seq_id in used:
                carriers.append(host.fork(cont.parent, 0))
            else:
                used.add(cont.parent.seq_id)
                carriers.append(cont.parent)
        for seq, cont in zip(carriers, running, strict=True):
            seq.token_ids.append(cont.token_id)
            beam.scores[seq.seq_id] = cont.score
        for seq in group.seqs:
            if seq.seq_id not in used:
                seq.status = SequenceStatus.FINISHED_STOPPED
                host.release(seq)
        group.seqs = carriers

    def _finish(self, group: SequenceGroup, host: SeqHost) -> None:
        for seq in group.seqs:
            seq.status = SequenceStatus.FINISHED_STOPPED
            host.release(seq)
        first = group.seqs[0]
        self.outputs.extend(
            whole_output(i, h.output_token_ids,
                         common_pb2.FINISH_REASON_STOP if h.ended_with_eos
                         else common_pb2.FINISH_REASON_LENGTH, h.cumulative_logprob, first)
            for i, h in enumerate(self.beam.best(max(self.n, 1))))


def strategy_for(params: common_pb2.SamplingParams, stop: StopCriteria) -> OutputStrategy:
    """The strategy a request with resolved ``params`` runs under."""
    if params.beam_width > 1:
        beam = BeamState(params.beam_width, params.length_penalty, params.early_stopping,
                         stop.stop_ids, params.max_tokens)
        return BeamOutputs(beam, params.n)
    if params.best_of > max(params.n, 1):
        return BestOfSamples(stop, params.n)
    return StreamSamples(stop, params.logprobs)


def whole_output(index: int, token_ids: list[int], finish_reason: common_pb2.FinishReason,
                 cumulative: float, seq: Sequence) -> scheduler_pb2.SeqOutput:
    return scheduler_pb2.SeqOutput(
        index=index, token_ids=token_ids, finish_reason=finish_reason, replaces=True,
        cumulative_logprob=cumulative, num_prompt_tokens=seq.num_prompt_tokens,
        num_cached_tokens=seq.num_cached_tokens)


def token_logprobs(token_id: int, logprob: float,
                   top: Seq[tuple[int, float]]) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(
        token_id=token_id, logprob=logprob,
        top=[common_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in top])
