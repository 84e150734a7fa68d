"""The one token-id range check, for every place ids arrive from outside: a client's prompt and
stop ids (router), a submit that bypassed the router (scheduler), a step's tokens (worker: a token
id indexes the embedding table, as a block id indexes the pool)."""

from __future__ import annotations

from collections.abc import Sequence

from pagedserve.core.errors import InvalidArgument


def check_token_ids(token_ids: Sequence[int], vocab_size: int | None, field: str) -> None:
    """Raises ``InvalidArgument`` naming ``field[i]``, the first id outside ``[0, vocab_size)``
    (``vocab_size`` None: only negative ids are refused). An empty sequence passes."""
    if not len(token_ids):
        return
    high = vocab_size if vocab_size is not None else float("inf")
    if min(token_ids) >= 0 and max(token_ids) < high:  # the common case: two C-speed passes
        return
    for i, token_id in enumerate(token_ids):
        if not 0 <= token_id < high:
            vocab = f"vocab_size={vocab_size}" if vocab_size is not None else "vocab_size"
            raise InvalidArgument(f"{field}[{i}]", f"{token_id} is not in [0, {vocab})")
