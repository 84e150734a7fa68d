"""When a sequence is done: a stop token (EOS included), max_tokens, or the model's context."""

from __future__ import annotations

from protos.pagedserve.v1 import common_pb2
from scheduler.sequence import SequenceStatus


class StopCriteria:
    """A request's stop conditions resolved once, as token counts and a set, so the per-token
    check in the step loop reads no protobuf fields. For a sequence of ``num_tokens`` tokens whose
    newest is ``token_id`` (output tokens = ``num_tokens - num_prompt_tokens``):

    - stopped: ``token_id in stop_ids`` once ``num_tokens >= min_len`` (``min_tokens`` outputs);
      ``stop_ids`` is the resolved ``params.stop_token_ids``, which already holds the model's EOS
      unless the client ignored it (``pagedserve.core.sampling``: the stop set has one home);
    - length: ``num_tokens >= max_len`` (``max_tokens`` outputs, or the model's context).
    Stop strings are the router's job (they need text)."""

    __slots__ = ("max_len", "min_len", "stop_ids")

    def __init__(self, params: common_pb2.SamplingParams, max_model_len: int,
                 num_prompt_tokens: int) -> None:
        self.stop_ids = frozenset(params.stop_token_ids)
        self.min_len = num_prompt_tokens + params.min_tokens
        self.max_len = min(num_prompt_tokens + params.max_tokens, max_model_len)

    def status(self, num_tokens: int, token_id: int) -> SequenceStatus | None:
        """The finished status after the newest token, or ``None`` to keep going."""
        if num_tokens >= self.min_len and token_id in self.stop_ids:
            return SequenceStatus.FINISHED_STOPPED
        if num_tokens >= self.max_len:
            return SequenceStatus.FINISHED_LENGTH
        return None
