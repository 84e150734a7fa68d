"""When a sequence is done: EOS, stop token ids, max_tokens, or the model's context."""

from __future__ import annotations

from collections.abc import Collection

from protos.pagedserve.v1 import common_pb2
from scheduler.sequence import Sequence, SequenceStatus


def check_stop(
    seq: Sequence,
    params: common_pb2.SamplingParams,
    eos_token_ids: Collection[int],
    max_model_len: int,
) -> SequenceStatus | None:
    """The finished status for ``seq`` after its newest token, or ``None`` to keep going.
    Stop strings are the router's job (they need text)."""
    last = seq.token_ids[-1]
    num_out = seq.num_output_tokens
    if num_out >= params.min_tokens:
        if not params.ignore_eos and last in eos_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        if last in params.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED
    if num_out >= params.max_tokens or seq.num_tokens >= max_model_len:
        return SequenceStatus.FINISHED_LENGTH
    return None
