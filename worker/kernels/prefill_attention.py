"""Prefill / extend attention: new tokens attend causally to cached prefix + themselves, paged.

Every K/V is read through the block table, including the new tokens' own (the caller has already
written them with ``reshape_and_cache``). That one rule makes prefix caching (prefix blocks
computed by an earlier request) and chunked prefill (prefix = earlier chunks) the same case::

    seq b (seq_lens[b] tokens):  [ context: cached, ctx_len = seq_len - query_len | new tokens ]
    query row i (flat row query_start_loc[b] + i) sits at position ctx_len + i and sees keys
    0 .. ctx_len + i (causal); keys are fetched from block_tables[b, pos // block_size].

Grid ``(num_seqs, num_heads, cdiv(max_query_len, BLOCK_M))``: a program owns ``BLOCK_M`` query
rows of one sequence and one head and runs an online softmax over key tiles of ``BLOCK_N``,
stopping at the last key its last row can see. Rows past the sequence's query length are padding:
computed on a valid key (position 0, so no row is all ``-inf``) and never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels import _launch

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    out_ptr,
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_bts,
    stride_btb,
    BLOCK_SIZE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    m_start = tl.program_id(2) * BLOCK_M
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if m_start < query_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        rows = m_start + tl.arange(0, BLOCK_M)
        row_ok = rows < query_len
        q_pos = seq_len - query_len + rows
        dims = tl.arange(0, DIM_PAD)
        dim_ok = dims < HEAD_DIM
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q_rows = (q_start + rows).to(tl.int64) * stride_qt + head * stride_qh
        q = tl.load(query_ptr + q_rows[:, None] + dims[None, :], mask=q_mask, other=0.0)
        q = q.to(key_cache_ptr.dtype.element_ty)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bts
        head_off = (head // GROUP_SIZE) * stride_ch + dims[None, :]
        key_end = tl.minimum(seq_len, seq_len - query_len + m_start + BLOCK_M)
        for n_start in range(0, key_end, BLOCK_N):
            pos = n_start + tl.arange(0, BLOCK_N)
            pos_ok = pos < key_end
            block = tl.load(table + (pos // BLOCK_SIZE) * stride_btb, mask=pos_ok, other=0)
            kv_rows = block.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_co
            kv_mask = pos_ok[:, None] & dim_ok[None, :]
            k = tl.load(key_cache_ptr + kv_rows[:, None] + head_off, mask=kv_mask, other=0.0)
            v = tl.load(value_cache_ptr + kv_rows[:, None] + head_off, mask=kv_mask, other=0.0)

            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_M, BLOCK_N]
            visible = pos_ok[None, :] & (pos[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new

        acc = acc / l_i[:, None]
        o_rows = (q_start + rows).to(tl.int64) * stride_ot + head * stride_oh
        tl.store(
            out_ptr + o_rows[:, None] + dims[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=q_mask,
        )


def prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], ragged over sequences
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context incl. the new tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    max_query_len: int,  # host copies: size the grid without a device sync
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:
    """Returns ``[num_tokens, num_heads, head_dim]`` in ``query``'s dtype.

    The new tokens' K/V must already be in the cache. Rows not covered by any sequence's
    ``query_start_loc`` range are left uninitialised.
    """
    block_size, num_kv_heads, head_dim = _launch.check_caches(key_cache, value_cache)
    group_size = _launch.check_query(query, key_cache, num_kv_heads, head_dim)
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    _launch.check_block_tables(block_tables, seq_lens, num_seqs, block_size, max_seq_len)
    _check_query_start_loc(query_start_loc, num_seqs)
    _launch.check_device(
        _prefill_kernel,
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=block_tables,
        seq_lens=seq_lens,
        query_start_loc=query_start_loc,
    )
    num_heads = query.shape[1]
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_seqs == 0 or max_query_len <= 0:
        return out
    dim_pad = _launch.padded_head_dim(head_dim)
    block_m, block_n = _tile_sizes(key_cache.dtype, dim_pad)
    grid = (num_seqs, num_heads, triton.cdiv(max_query_len, block_m))
    _prefill_kernel[grid](
        out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
        scale * _LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0), block_tables.stride(1),
        BLOCK_SIZE=block_size,
        GROUP_SIZE=group_size,
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=4,
        num_stages=2,
    )  # fmt: skip
    return out


def _tile_sizes(cache_dtype: torch.dtype, dim_pad: int) -> tuple[int, int]:
    """Smaller tiles for 4-byte elements and wide heads keep K/V staging within shared memory."""
    if cache_dtype == torch.float32 or dim_pad > 128:
        return 32, 32
    return 64, 64


def _check_query_start_loc(query_start_loc: torch.Tensor, num_seqs: int) -> None:
    _launch.check_dtype("query_start_loc", query_start_loc, _launch.INDEX_DTYPES)
    if query_start_loc.dim() != 1 or query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"query_start_loc must be [num_seqs + 1 = {num_seqs + 1}], got "
            f"{tuple(query_start_loc.shape)}"
        )
    if not query_start_loc.is_contiguous():
        raise ValueError("query_start_loc must be contiguous")
