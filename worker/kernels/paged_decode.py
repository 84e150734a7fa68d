"""Paged decode attention: one query token per sequence, flash-decoding over partitions.

Grid ``(num_seqs, num_kv_heads, max_num_partitions)``. A program owns one sequence, one KV head
and one partition of ``partition_size`` context tokens, and attends with *all* query heads of
that KV head's GQA group at once, so each K/V byte is read once per group::

    context of seq b:  | part 0 | part 1 | ... | part p (ends at seq_lens[b], maybe mid-block) |
                         ▼         ▼               ▼
    per (b, head, p):  m = running max, l = sum exp, o = l-normalised partial output
                         └────────── reduce kernel: softmax-weighted sum over p ──────────┘

Within a partition the program walks ``TILE`` tokens at a time; a tile may span several blocks,
so each token looks up its own physical block (``block_tables[b, pos // block_size]``). Tokens at
or past ``seq_lens[b]`` are masked at load, so the tail of the last block is never read.
When every sequence fits in one partition the first kernel normalises and writes the output
directly and the reduce kernel is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels import _launch

DEFAULT_PARTITION_SIZE = 512
TILE = 64  # context tokens per inner iteration; partition_size must be a multiple
_LOG2E = 1.4426950408889634


@triton.jit
def _decode_partition_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim], used when SINGLE_PARTITION
    part_out_ptr,  # [num_seqs, num_heads, max_parts, DIM_PAD] fp32
    part_max_ptr,  # [num_seqs, num_heads, max_parts] fp32
    part_sum_ptr,
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
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
    partition_size,
    max_parts,
    BLOCK_SIZE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    TILE: tl.constexpr,
    SINGLE_PARTITION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = part * partition_size
    if start < seq_len:
        end = tl.minimum(start + partition_size, seq_len)
        group = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, DIM_PAD)
        heads = kv_head * GROUP_SIZE + group
        row_ok = group < GROUP_SIZE
        dim_ok = dims < HEAD_DIM
        q_ptrs = (
            query_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + dims[None, :]
        )
        q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        q = q.to(key_cache_ptr.dtype.element_ty)

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bts
        head_off = kv_head * stride_ch + dims[None, :]
        for tile_start in range(start, end, TILE):
            pos = tile_start + tl.arange(0, TILE)
            pos_ok = pos < end
            block = tl.load(table + (pos // BLOCK_SIZE) * stride_btb, mask=pos_ok, other=0)
            row = block.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_co
            kv_mask = pos_ok[:, None] & dim_ok[None, :]
            k = tl.load(key_cache_ptr + row[:, None] + head_off, mask=kv_mask, other=0.0)
            v = tl.load(value_cache_ptr + row[:, None] + head_off, mask=kv_mask, other=0.0)

            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [GROUP_PAD, TILE]
            s = tl.where(pos_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new

        acc = acc / l_i[:, None]
        if SINGLE_PARTITION:
            o_ptrs = (
                out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + dims[None, :]
            )
            o_mask = row_ok[:, None] & dim_ok[None, :]
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            stat = (seq * (GROUP_SIZE * tl.num_programs(1)) + heads) * max_parts + part
            tl.store(part_max_ptr + stat, m_i, mask=row_ok)
            tl.store(part_sum_ptr + stat, l_i, mask=row_ok)
            po_ptrs = part_out_ptr + stat.to(tl.int64)[:, None] * DIM_PAD + dims[None, :]
            tl.store(po_ptrs, acc, mask=row_ok[:, None])


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    seq_lens_ptr,
    stride_ot,
    stride_oh,
    partition_size,
    max_parts,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    PARTS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_parts = tl.cdiv(seq_len, partition_size)
    parts = tl.arange(0, PARTS_PAD)
    part_ok = parts < num_parts
    dims = tl.arange(0, DIM_PAD)
    stat = (seq * tl.num_programs(1) + head) * max_parts + parts
    m = tl.load(part_max_ptr + stat, mask=part_ok, other=float("-inf"))
    sums = tl.load(part_sum_ptr + stat, mask=part_ok, other=0.0)
    weight = sums * tl.exp2(m - tl.max(m, axis=0))  # base 2, as in the partition kernel
    weight = tl.where(part_ok, weight, 0.0)
    o = tl.load(
        part_out_ptr + stat.to(tl.int64)[:, None] * DIM_PAD + dims[None, :],
        mask=part_ok[:, None],
        other=0.0,
    )
    out = tl.sum(o * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    o_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + dims
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def paged_decode(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, >= 1
    max_seq_len: int,  # host copy of max(seq_lens): sizes the grid without a device sync
    scale: float,
    partition_size: int = DEFAULT_PARTITION_SIZE,
) -> torch.Tensor:
    """Returns ``[num_seqs, num_heads, head_dim]`` in ``query``'s dtype.

    Every ``seq_lens[b]`` must be at least 1 and at most ``max_seq_len``.
    """
    block_size, num_kv_heads, head_dim = _launch.check_caches(key_cache, value_cache)
    group_size = _launch.check_query(query, key_cache, num_kv_heads, head_dim)
    num_seqs, num_heads = query.shape[0], query.shape[1]
    _launch.check_block_tables(block_tables, seq_lens, num_seqs, block_size, max_seq_len)
    _check_partition_size(partition_size)
    _launch.check_device(
        _decode_partition_kernel,
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=block_tables,
        seq_lens=seq_lens,
    )
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if num_seqs == 0 or max_seq_len <= 0:
        return out
    num_parts = triton.cdiv(max_seq_len, partition_size)
    dim_pad = _launch.padded_head_dim(head_dim)
    # fp32 staging for the reduce; unused (but must be valid pointers) with one partition.
    stats_shape = (num_seqs, num_heads, num_parts) if num_parts > 1 else (1,)
    part_out = torch.empty(*stats_shape, dim_pad, dtype=torch.float32, device=query.device)
    part_max = torch.empty(stats_shape, dtype=torch.float32, device=query.device)
    part_sum = torch.empty_like(part_max)
    _decode_partition_kernel[(num_seqs, num_kv_heads, num_parts)](
        out, part_out, part_max, part_sum,
        query, key_cache, value_cache, block_tables, seq_lens,
        scale * _LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0), block_tables.stride(1),
        partition_size, num_parts,
        BLOCK_SIZE=block_size,
        GROUP_SIZE=group_size,
        GROUP_PAD=max(16, _launch.next_power_of_2(group_size)),  # tl.dot needs M >= 16
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        TILE=TILE,
        SINGLE_PARTITION=num_parts == 1,
        num_warps=4,
    )  # fmt: skip
    if num_parts > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_out, part_max, part_sum, seq_lens,
            out.stride(0), out.stride(1), partition_size, num_parts,
            HEAD_DIM=head_dim,
            DIM_PAD=dim_pad,
            PARTS_PAD=_launch.next_power_of_2(num_parts),
        )  # fmt: skip
    return out


def _check_partition_size(partition_size: int) -> None:
    if partition_size < TILE or partition_size % TILE != 0:
        raise ValueError(
            f"partition_size must be a positive multiple of {TILE}, got {partition_size}"
        )
