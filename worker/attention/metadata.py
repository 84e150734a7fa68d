"""Attention metadata: how one step's flattened tokens map onto paged KV memory.

A step runs a *ragged batch*: the new tokens of every scheduled sequence are concatenated into one
flat dimension of ``num_tokens``. Sequence ``b`` owns rows
``query_start_loc[b]:query_start_loc[b+1]``
and, counting its cached context, is ``seq_lens[b]`` tokens long after this step::

    seq b:  [ ...cached context (seq_lens[b] - query_len_b)... | query_len_b new tokens ]
    row  :                                                      query_start_loc[b] ...

New token ``i`` of sequence ``b`` sits at position ``seq_lens[b] - query_len_b + i`` and attends to
every position up to and including its own (causal). Its K/V are written to ``slot_mapping[row]``,
where ``slot = block_id * block_size + offset``; a negative slot is padding and is skipped.
Position ``p`` of sequence ``b`` is read from block ``block_tables[b, p // block_size]`` at offset
``p % block_size``; entries past the sequence's length are padding and are never read.

Caches are laid out ``[num_blocks, block_size, num_kv_heads, head_dim]``, one K and one V per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    """Per-step tensors, all on the model's device.

    Invariants: ``query_start_loc`` is non-decreasing with ``query_start_loc[0] == 0`` and
    ``query_start_loc[-1] == num_tokens``; ``seq_lens[b] >= query_len_b``;
    ``block_tables.shape[1] * block_size >= max(seq_lens)``.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [batch + 1] int32
    seq_lens: torch.Tensor  # [batch] int32, context length including the new tokens
    block_tables: torch.Tensor  # [batch, max_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Host copies, so that backends can branch without a device sync.
    is_decode_only: bool = False  # every sequence has exactly one new token
    # Host (numpy) copies of ``seq_lens`` / query lengths / ``block_tables``, when the caller has
    # them (the model runner does), so a CPU backend can plan a step without reading tensors back.
    host: HostMetadata | None = None
    # What a backend derives once per step (gather indices, masks) and reuses in every layer.
    scratch: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])


@dataclass(frozen=True)
class HostMetadata:
    seq_lens: np.ndarray  # [batch] int64
    query_lens: np.ndarray  # [batch] int64
    block_tables: np.ndarray  # [batch, max_blocks_per_seq] int32
