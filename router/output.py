"""Turns the scheduler's token stream into the client's text stream, for one request.

The scheduler sends ``SeqOutput``s (new token ids per output index, and a finish reason when an
output ends). ``OutputProcessor`` keeps one ``_OutputState`` per index (detokenizer, stop-string
matcher, counts) and returns the ``GenerateResponse`` messages to send. It decides when the router
is done with an output (a stop string hit ends it even though the scheduler is still generating),
so the caller cancels the upstream call once ``all_finished`` is true.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from protos.pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2
from router.detokenizer import IncrementalDetokenizer, StopStringMatcher
from router.tokenizer import Tokenizer

FinishReason = common_pb2.FinishReason


@dataclass
class _OutputState:
    """One output's progress. ``is_finished`` is the router's view: set by the scheduler's finish
    reason or by a stop string; messages for a finished output are ignored."""

    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher
    num_tokens: int = 0
    num_cached_tokens: int = 0
    is_finished: bool = False
    replaced_ids: list[int] = field(default_factory=list)


class OutputProcessor:
    """Owns the text state of every output of one request; holds no I/O. ``params`` are
    resolved (``pagedserve.core.sampling.resolve_sampling_params`` with the model's EOS ids), so
    ``params.stop_token_ids`` is the request's whole stop set."""

    def __init__(
        self,
        request_id: str,
        tokenizer: Tokenizer,
        params: common_pb2.SamplingParams,
        num_prompt_tokens: int,
    ) -> None:
        self.request_id = request_id
        self._tokenizer = tokenizer
        self._params = params
        self._num_prompt_tokens = num_prompt_tokens
        # Resolved params carry the whole stop set, EOS included (pagedserve.core.sampling).
        self._stop_token_ids = frozenset(params.stop_token_ids)
        self._outputs = [self._new_state() for _ in range(max(params.n, 1))]

    @property
    def all_finished(self) -> bool:
        return all(state.is_finished for state in self._outputs)

    def process(
        self, response: scheduler_pb2.RequestUpdate | scheduler_pb2.SubmitResponse
    ) -> list[generation_pb2.GenerateResponse]:
        """The messages to send for one update of the request (possibly none)."""
        messages = []
        for seq in response.outputs:
            if seq.index >= len(self._outputs) or self._outputs[seq.index].is_finished:
                continue
            state = self._outputs[seq.index]
            state.num_cached_tokens = max(state.num_cached_tokens, seq.num_cached_tokens)
            message = self._replace(state, seq) if seq.replaces else self._append(state, seq)
            if message is not None:
                messages.append(message)
        return messages

    def abort_unfinished(self) -> list[generation_pb2.GenerateResponse]:
        """Final messages for outputs the scheduler never finished (its stream ended early)."""
        messages = []
        for index, state in enumerate(self._outputs):
            if not state.is_finished:
                text = state.matcher.feed(state.detokenizer.flush(), can_stop=False)[0]
                messages.append(self._finish(index, state, text + state.matcher.flush(), [], [],
                                             common_pb2.FINISH_REASON_ABORT))
        return messages

    # --- internal -----------------------------------------------------------------------------

    def _new_state(self) -> _OutputState:
        return _OutputState(
            IncrementalDetokenizer(
                self._tokenizer, skip_special_tokens=self._params.skip_special_tokens
            ),
            StopStringMatcher(self._params.stop,
                              include_stop_in_output=self._params.include_stop_str_in_output),
        )

    def _append(
        self, state: _OutputState, seq: scheduler_pb2.SeqOutput
    ) -> generation_pb2.GenerateResponse | None:
        token_ids = list(seq.token_ids)
        state.num_tokens += len(token_ids)
        text_ids = self._ids_to_detokenize(token_ids, seq.finish_reason)
        delta = state.detokenizer.add(text_ids)
        if seq.finish_reason:
            delta += state.detokenizer.flush()
        text, stopped = state.matcher.feed(delta, can_stop=self._can_stop(state))
        if stopped or seq.finish_reason:
            reason = common_pb2.FINISH_REASON_STOP if stopped else seq.finish_reason
            tail = "" if stopped else state.matcher.flush()
            return self._finish(seq.index, state, text + tail, token_ids, seq.logprobs, reason)
        if not text and not token_ids:
            return None
        return self._message(seq.index, text, token_ids, seq.logprobs)

    def _replace(
        self, state: _OutputState, seq: scheduler_pb2.SeqOutput
    ) -> generation_pb2.GenerateResponse | None:
        """Beam search: ``token_ids`` is the whole output so far. Nothing is streamed while beams
        can still change; the finished output is sent once, as full text and full ids."""
        state.replaced_ids = list(seq.token_ids)
        state.num_tokens = len(state.replaced_ids)
        text_ids = self._ids_to_detokenize(state.replaced_ids, seq.finish_reason)
        full_text = self._tokenizer.decode(
            text_ids, skip_special_tokens=self._params.skip_special_tokens
        )
        matcher = StopStringMatcher(self._params.stop,
                                    include_stop_in_output=self._params.include_stop_str_in_output)
        text, stopped = matcher.feed(full_text, can_stop=self._can_stop(state))
        if not (stopped or seq.finish_reason):
            return None
        reason = common_pb2.FINISH_REASON_STOP if stopped else seq.finish_reason
        return self._finish(seq.index, state, text + ("" if stopped else matcher.flush()),
                            state.replaced_ids, seq.logprobs, reason)

    def _ids_to_detokenize(self, token_ids: list[int], finish_reason: FinishReason) -> list[int]:
        """A stop token that ended the output is not part of its text (unless asked for)."""
        if (finish_reason == common_pb2.FINISH_REASON_STOP and token_ids
                and token_ids[-1] in self._stop_token_ids
                and not self._params.include_stop_str_in_output):
            return token_ids[:-1]
        return token_ids

    def _can_stop(self, state: _OutputState) -> bool:
        return state.num_tokens >= self._params.min_tokens

    def _message(
        self, index: int, text: str, token_ids: Sequence[int],
        logprobs: Iterable[common_pb2.TokenLogprobs],
    ) -> generation_pb2.GenerateResponse:
        return generation_pb2.GenerateResponse(
            request_id=self.request_id, index=index, text=text,
            token_ids=token_ids, logprobs=logprobs,
        )

    def _finish(
        self, index: int, state: _OutputState, text: str, token_ids: Sequence[int],
        logprobs: Iterable[common_pb2.TokenLogprobs], reason: FinishReason,
    ) -> generation_pb2.GenerateResponse:
        state.is_finished = True
        message = self._message(index, text, token_ids, logprobs)
        message.finish_reason = reason
        message.usage.CopyFrom(common_pb2.Usage(
            prompt_tokens=self._num_prompt_tokens, completion_tokens=state.num_tokens,
            cached_tokens=state.num_cached_tokens,
        ))
        return message
