"""When a sequence is done: EOS, stop token ids, max_tokens, or the model's context."""

from __future__ import annotations

from collections.abc import Collection

from protos.pagedserve.v1 import common_pb2
from scheduler.sequence import Sequence, SequenceStatus


class StopCriteria:
    """A request's stop conditions resolved once, as token counts and a set, so the per-token
    check in the step loop reads no protobuf fields. For a sequence of ``num_tokens`` tokens whose
    newest is ``token_id`` (output tokens = ``num_tokens - num_prompt_tokens``):

    - stopped: ``token_id in stop_ids`` (EOS unless ignored, plus stop_token_ids) once
      ``num_tokens >= min_len`` (``min_tokens`` outputs);
    - length: ``num_tokens >= max_len`` (``max_tokens`` outputs, or the model's context).
    Stop strings are the router's job (they need text)."""

    __slots__ = ("max_len", "min_len", "stop_ids")

    def __init__(self, params: common_pb2.SamplingParams, eos_token_ids: Collection[int],
                 max_model_len: int, num_prompt_tokens: int) -> None:
        eos = () if params.ignore_eos else tuple(eos_token_ids)
        self.stop_ids = frozenset((*eos, *params.stop_token_ids))
        self.min_len = num_prompt_tokens + params.min_tokens
        self.max_len = min(num_prompt_tokens + params.max_tokens, max_model_len)

    def status(self, num_tokens: int, token_id: int) -> SequenceStatus | None:
        """The finished status after the newest token, or ``None`` to keep going."""
        if num_tokens >= self.min_len and token_id in self.stop_ids:
            return SequenceStatus.FINISHED_STOPPED
        if num_tokens >= self.max_len:
            return SequenceStatus.FINISHED_LENGTH
        return None


def check_stop(
    seq: Sequence,
    params: common_pb2.SamplingParams,
    eos_token_ids: Collection[int],
    max_model_len: int,
) -> SequenceStatus | None:
    """The finished status for ``seq`` after its newest token, or ``None`` to keep going."""
    criteria = StopCriteria(params, eos_token_ids, max_model_len, seq.num_prompt_tokens)
    return criteria.status(seq.num_tokens, seq.token_ids[-1])
