"""Random paged batches for the kernel tests, built the way the scheduler builds them.

Physical blocks are a random permutation of the pool (tables are non-contiguous), sequences may
share their first full blocks (prefix caching / parallel sampling), block tables carry padding
columns, and contexts end mid-block. ``poison_dead_slots`` sets every cache slot that no
sequence may read to NaN, so a kernel that touches one produces NaN instead of passing by luck.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from worker.attention.metadata import AttentionMetadata

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (dtype, head_dim, block_size) for the CUDA sweeps: every 16-bit combination, fp32 spot checks.
GPU_SWEEP = [
    (dtype, head_dim, block_size)
    for dtype in (torch.float16, torch.bfloat16)
    for head_dim in (64, 80, 96, 128)
    for block_size in (8, 16, 32)
] + [(torch.float32, 80, 8), (torch.float32, 128, 16)]

TOLERANCE = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 3e-3, "rtol": 1e-2},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@dataclass
class PagedBatch:
    """One step's inputs; the new tokens' K/V are already in the caches."""

    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float


def make_batch(
    seqs: list[tuple[int, int]],  # (cached context length, new tokens) per sequence
    *,
    num_kv_heads: int,
    group_size: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    num_shared_blocks: int = 0,
    table_padding: int = 2,
    seed: int = 0,
) -> PagedBatch:
    """Sequences share their first ``num_shared_blocks`` physical blocks (all full, in context)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [ctx + new for ctx, new in seqs]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    if any(ctx < num_shared_blocks * block_size for ctx, _ in seqs):
        raise ValueError("shared blocks must be full blocks of every sequence's cached context")
    num_private = sum(n - num_shared_blocks for n in blocks_per_seq)
    num_blocks = num_shared_blocks + num_private + 3  # + never-referenced blocks
    physical = torch.randperm(num_blocks, generator=gen).tolist()
    shared, private = physical[:num_shared_blocks], iter(physical[num_shared_blocks:])
    width = max(blocks_per_seq) + table_padding
    unused = physical[-1]
    table = torch.full((len(seqs), width), unused, dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        ids = shared + [next(private) for _ in range(n - num_shared_blocks)]
        table[b, :n] = torch.tensor(ids, dtype=torch.int32)

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(dtype)
    value_cache = torch.randn(shape, generator=gen).to(dtype)
    query_lens = torch.tensor([new for _, new in seqs])
    num_tokens = int(query_lens.sum())
    query = torch.randn(num_tokens, num_kv_heads * group_size, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=slot_mapping_for(seqs, table, block_size),
        query_start_loc=torch.cat([torch.zeros(1), query_lens.cumsum(0)]).to(torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=table,
        max_query_len=int(query_lens.max()),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        is_decode_only=all(new == 1 for _, new in seqs),
    )
    return _to_device(PagedBatch(query, key_cache, value_cache, meta, head_dim**-0.5))


def slot_mapping_for(
    seqs: list[tuple[int, int]], table: torch.Tensor, block_size: int
) -> torch.Tensor:
    slots = []
    for b, (ctx, new) in enumerate(seqs):
        pos = torch.arange(ctx, ctx + new)
        slots.append(table[b, pos // block_size].long() * block_size + pos % block_size)
    return torch.cat(slots)


def poison_dead_slots(batch: PagedBatch) -> None:
    """NaN-fills every slot at or past its sequence's length and every unreferenced block."""
    meta, block_size = batch.meta, batch.meta.block_size
    live = torch.zeros(batch.key_cache.shape[:2], dtype=torch.bool, device=batch.key_cache.device)
    for b, seq_len in enumerate(meta.seq_lens.tolist()):
        pos = torch.arange(seq_len, device=live.device)
        live[meta.block_tables[b, pos // block_size].long(), pos % block_size] = True
    batch.key_cache[~live] = float("nan")
    batch.value_cache[~live] = float("nan")


def reference_output(batch: PagedBatch) -> torch.Tensor:
    """The torch oracle in fp32 on the same (possibly low-precision) inputs."""
    from worker.attention.torch_backend import paged_attention_reference

    return paged_attention_reference(
        batch.query.float(), batch.key_cache.float(), batch.value_cache.float(), batch.meta,
        batch.scale,
    )  # fmt: skip


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE[dtype])


def _to_device(batch: PagedBatch) -> PagedBatch:
    m = batch.meta
    meta = AttentionMetadata(
        slot_mapping=m.slot_mapping.to(DEVICE),
        query_start_loc=m.query_start_loc.to(DEVICE),
        seq_lens=m.seq_lens.to(DEVICE),
        block_tables=m.block_tables.to(DEVICE),
        max_query_len=m.max_query_len,
        max_seq_len=m.max_seq_len,
        block_size=m.block_size,
        is_decode_only=m.is_decode_only,
    )
    return PagedBatch(
        batch.query.to(DEVICE), batch.key_cache.to(DEVICE), batch.value_cache.to(DEVICE), meta,
        batch.scale,
    )  # fmt: skip
