"""Prefill/extend attention over paged prefix + causal new tokens matches the torch reference."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.kernel_cases import (
    GPU_SWEEP,
    PagedBatch,
    assert_close,
    make_batch,
    poison_dead_slots,
    reference_output,
    requires_gpu,
)
from worker.kernels.prefill_attention import prefill_attention

# (cached context, new tokens): fresh prompt, prefix-cached extend ending mid-block, a decode
# row inside a mixed batch, a chunk that spans two query tiles after a long prefix.
MIXED = [(0, 37), (40, 25), (13, 1), (70, 66)]


def _prefill(batch: PagedBatch) -> torch.Tensor:
    m = batch.meta
    return prefill_attention(
        batch.query, batch.key_cache, batch.value_cache, m.block_tables, m.seq_lens,
        m.query_start_loc, m.max_query_len, m.max_seq_len, batch.scale,
    )  # fmt: skip


def _check(batch: PagedBatch, dtype: torch.dtype) -> None:
    expected = reference_output(batch)
    poison_dead_slots(batch)
    assert_close(_prefill(batch), expected, dtype)


@pytest.mark.parametrize(
    "head_dim, block_size, dtype, group_size",
    [
        (64, 16, torch.float32, 4),
        (80, 8, torch.float16, 2),
        (96, 32, torch.float32, 1),
        (128, 16, torch.float16, 2),
    ],
)
def test_matches_reference(head_dim, block_size, dtype, group_size) -> None:
    batch = make_batch(
        MIXED, num_kv_heads=2, group_size=group_size, head_dim=head_dim,
        block_size=block_size, dtype=dtype,
    )  # fmt: skip
    _check(batch, dtype)


def test_requests_sharing_cached_prefix_blocks() -> None:
    # Two requests hit the same two cached prompt blocks and extend with different suffixes.
    batch = make_batch(
        [(32, 9), (35, 20)], num_kv_heads=1, group_size=4, head_dim=64, block_size=16,
        dtype=torch.float32, num_shared_blocks=2,
    )  # fmt: skip
    _check(batch, torch.float32)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype, head_dim, block_size", GPU_SWEEP)
def test_matches_reference_gpu_sweep(dtype, head_dim, block_size) -> None:
    seqs = [(0, 300), (block_size * 20 + 3, 129), (17, 1), (1000, 64), (0, 1)]
    batch = make_batch(
        seqs, num_kv_heads=2, group_size=4, head_dim=head_dim, block_size=block_size,
        dtype=dtype, num_shared_blocks=0, seed=head_dim * block_size,
    )  # fmt: skip
    _check(batch, dtype)


def test_rejects_bad_inputs_with_clear_errors() -> None:
    batch = make_batch(
        [(5, 3)], num_kv_heads=2, group_size=2, head_dim=64, block_size=16, dtype=torch.float32
    )
    m = batch.meta
    with pytest.raises(ValueError, match="query_start_loc must be"):
        prefill_attention(
            batch.query,
            batch.key_cache,
            batch.value_cache,
            m.block_tables,
            m.seq_lens,
            m.query_start_loc[:1],
            3,
            8,
            1.0,
        )
    with pytest.raises(ValueError, match="head_dim"):
        prefill_attention(
            batch.query[..., :32],
            batch.key_cache,
            batch.value_cache,
            m.block_tables,
            m.seq_lens,
            m.query_start_loc,
            3,
            8,
            1.0,
        )
    with pytest.raises(ValueError, match="strides differ"):
        prefill_attention(
            batch.query,
            batch.key_cache,
            batch.value_cache.transpose(1, 2).contiguous().transpose(1, 2),
            m.block_tables,
            m.seq_lens,
            m.query_start_loc,
            3,
            8,
            1.0,
        )
