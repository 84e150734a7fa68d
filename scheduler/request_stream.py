"""``RequestStream``: the outputs of one request, from the step loop to one consumer (the
scheduler servicer's ``Submit``, a router's ``Connect`` call, or ``LLM``), coalesced so the step
loop builds no messages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from protos.pagedserve.v1 import scheduler_pb2
from scheduler.sequence import SequenceStatus

if TYPE_CHECKING:
    from scheduler.engine_core import CoreRequest

_STREAMED_FINISH = (SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH)


class RequestStream:
    """The outputs of one request, in order; ends after every sequence has finished.

    The step loop builds no messages: the engine core appends sampled tokens to the request's
    sequences (its output strategy keeps log-prob records and whole outputs), and the runtime
    calls ``notify``. The consumer, when it wakes, turns everything not yet streamed into ONE
    ``SubmitResponse`` (so a slow consumer gets several tokens per message): per sequence, the
    tokens past ``num_prompt_tokens + num_streamed_tokens`` with their pending log-probs and,
    once, the finish reason of a sequence that stopped or hit its length (an aborted one just
    ends); then any whole outputs (beam search, ``best_of > n``). Taking clears the request's
    ``has_news``, so the core lists it again with the next news.
    ``close`` ends the stream after what is pending; with an error, the error is raised then.

    A consumer that serves many streams (``scheduler.connection.RouterConnection``) sets
    ``listener`` instead of iterating: it is called on each ``notify`` and collects with ``take``.
    """

    def __init__(self, request_id: str, request: CoreRequest | None = None) -> None:
        self.request_id = request_id
        self.request = request
        self.finished = False  # closed: nothing more will be added
        self.has_data = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._finish_sent: set[int] = set()  # seq ids whose finish reason was streamed
        self.listener: Callable[[RequestStream], None] | None = None

    def notify(self) -> None:
        """The request has news (tokens, log-probs, whole outputs), or the stream closed."""
        self.has_data = True
        if self.listener is not None:
            self.listener(self)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self, error: BaseException | None = None) -> None:
        if not self.finished:
            self.finished = True
            self._error = error
            self.notify()

    async def __aiter__(self) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        while True:
            if not self.has_data:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            outputs, closed = self.take()
            if outputs:
                yield scheduler_pb2.SubmitResponse(outputs=outputs)
            if closed:
                if self._error is not None:
                    raise self._error
                return

    @property
    def error(self) -> BaseException | None:
        """Why a closed stream ended, or None (finished or aborted)."""
        return self._error

    def take(self) -> tuple[list[scheduler_pb2.SeqOutput], bool]:
        """Everything not yet streamed, and whether the stream has ended (nothing will follow)."""
        closed = self.finished  # read before draining: a closed stream gets nothing more
        self.has_data = False
        request = self.request
        if request is None:
            return [], closed
        request.has_news = False
        outputs = self._token_outputs(request)
        whole = request.strategy.outputs
        if whole:
            outputs.extend(whole)
            request.strategy.outputs = []
        return outputs, closed

    def _token_outputs(self, request: CoreRequest) -> list[scheduler_pb2.SeqOutput]:
        group = request.group
        if not group.streams_tokens:
            return []
        pending_logprobs = request.strategy.logprobs
        outputs = []
        for seq in group.seqs:
            start = seq.num_prompt_tokens + seq.num_streamed_tokens
            finish = (seq.status in _STREAMED_FINISH and seq.seq_id not in self._finish_sent)
            if len(seq.token_ids) <= start and not finish:
                continue
            out = scheduler_pb2.SeqOutput(
                index=seq.index, token_ids=seq.token_ids[start:],
                num_cached_tokens=seq.num_cached_tokens, num_prompt_tokens=seq.num_prompt_tokens,
                cumulative_logprob=seq.cumulative_logprob)
            seq.num_streamed_tokens = len(seq.token_ids) - seq.num_prompt_tokens
            if finish:
                out.finish_reason = seq.status.finish_reason
                self._finish_sent.add(seq.seq_id)
            logprobs = pending_logprobs.pop(seq.index, None)
            if logprobs:
                out.logprobs.extend(logprobs)
            outputs.append(out)
        return outputs
