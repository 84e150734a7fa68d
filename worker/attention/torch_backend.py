"""Torch reference paged attention: the CPU backend and the oracle for the Triton kernels.

Reads K/V only through block tables and writes them only through the slot mapping (see
``metadata.py``). There is no Python loop over sequences or blocks: one batched gather pulls each
sequence's blocks into a padded ``[batch, max_seq_len]`` view and one masked SDPA call attends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.attention.metadata import AttentionMetadata


class TorchAttentionBackend:
    """Stateless; safe to share between layers."""

    name = "torch"

    def write_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens] int64, negative = padding
    ) -> None:
        write_kv_reference(key, value, key_cache, value_cache, slot_mapping)

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        return paged_attention_reference(query, key_cache, value_cache, meta, scale)


def write_kv_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    flat_k = key_cache.view(-1, num_kv_heads, head_dim)
    flat_v = value_cache.view(-1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, key, value = slot_mapping[valid], key[valid], value[valid]
    flat_k.index_copy_(0, slot_mapping, key.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, value.to(flat_v.dtype))


def gather_context(
    cache: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int
) -> torch.Tensor:
    """``[batch, max_seq_len, num_kv_heads, head_dim]``: each sequence's positions, in order."""
    block_size = cache.shape[1]
    num_blocks = (max_seq_len + block_size - 1) // block_size
    table = block_tables[:, :num_blocks].long()
    gathered = cache[table]  # [batch, num_blocks, block_size, kv_heads, head_dim]
    batch = table.shape[0]
    return gathered.view(batch, num_blocks * block_size, *cache.shape[2:])[:, :max_seq_len]


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = query.shape
    batch, max_len = meta.num_seqs, meta.max_seq_len
    keys = gather_context(key_cache, meta.block_tables, max_len).to(query.dtype)
    values = gather_context(value_cache, meta.block_tables, max_len).to(query.dtype)
    seq_lens = meta.seq_lens.long()
    key_pos = torch.arange(max_len, device=query.device)

    if meta.is_decode_only:
        q = query.view(batch, 1, num_heads, head_dim)
        mask = (key_pos[None, :] < seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
        out = _sdpa(q, keys, values, mask, scale)
        return out.reshape(num_tokens, num_heads, head_dim)

    # Ragged queries -> padded [batch, max_query_len]; row r of the flat batch is (seq_idx, i).
    starts = meta.query_start_loc.long()
    query_lens = starts[1:] - starts[:-1]
    seq_idx = torch.repeat_interleave(torch.arange(batch, device=query.device), query_lens)
    offset = torch.arange(num_tokens, device=query.device) - starts[seq_idx]
    padded = query.new_zeros(batch, meta.max_query_len, num_heads, head_dim)
    padded[seq_idx, offset] = query

    query_pos = (seq_lens - query_lens)[:, None] + torch.arange(
        meta.max_query_len, device=query.device
    )  # [B, Q]
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # causal, also bounds by seq_len
    mask[:, :, 0] = True  # padded query rows attend to something; their output is dropped
    out = _sdpa(padded, keys, values, mask[:, None], scale)
    return out[seq_idx, offset]


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Inputs ``[B, S, H, D]``; GQA is expanded by SDPA. Returns ``[B, Sq, Hq, D]``."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)
