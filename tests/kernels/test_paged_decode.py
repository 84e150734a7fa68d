"""Paged decode attention matches the torch reference, across partitions, GQA and layouts."""

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
from worker.kernels.paged_decode import paged_decode

# Context lengths: a single token, exactly one block, mid-block, several partitions.
RAGGED = [(0, 1), (15, 1), (70, 1), (200, 1)]


def _decode(batch: PagedBatch, partition_size: int) -> torch.Tensor:
    m = batch.meta
    return paged_decode(
        batch.query, batch.key_cache, batch.value_cache, m.block_tables, m.seq_lens,
        m.max_seq_len, batch.scale, partition_size=partition_size,
    )  # fmt: skip


def _check(batch: PagedBatch, dtype: torch.dtype, partition_size: int) -> None:
    expected = reference_output(batch)
    poison_dead_slots(batch)
    assert_close(_decode(batch, partition_size), expected, dtype)


@pytest.mark.parametrize(
    "head_dim, block_size, dtype, group_size, partition_size",
    [
        (64, 16, torch.float32, 4, 512),  # one partition: written directly, no reduce
        (80, 8, torch.float16, 2, 64),  # non-power-of-two head dim, 4 partitions
        (96, 32, torch.float32, 1, 64),  # plain multi-head attention
        (128, 16, torch.float16, 4, 128),
    ],
)
def test_matches_reference(head_dim, block_size, dtype, group_size, partition_size) -> None:
    batch = make_batch(
        RAGGED, num_kv_heads=2, group_size=group_size, head_dim=head_dim,
        block_size=block_size, dtype=dtype,
    )  # fmt: skip
    _check(batch, dtype, partition_size)


def test_parallel_samples_sharing_prompt_blocks() -> None:
    # Three samples of one prompt: two shared full blocks, private partial tails.
    batch = make_batch(
        [(40, 1), (37, 1), (33, 1)], num_kv_heads=1, group_size=2, head_dim=64,
        block_size=16, dtype=torch.float32, num_shared_blocks=2,
    )  # fmt: skip
    _check(batch, torch.float32, 64)


def test_non_contiguous_query_and_block_table_view() -> None:
    batch = make_batch(
        [(9, 1), (100, 1)], num_kv_heads=2, group_size=2, head_dim=64, block_size=16,
        dtype=torch.float32, table_padding=3,
    )  # fmt: skip
    fused = torch.cat([batch.query, torch.zeros_like(batch.query)], dim=1)
    batch.query = fused[:, : batch.query.shape[1]]  # strided rows, as from a fused QKV
    batch.meta.block_tables = batch.meta.block_tables[:, :-2]  # a column slice
    assert not batch.query.is_contiguous() and not batch.meta.block_tables.is_contiguous()
    _check(batch, torch.float32, 64)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype, head_dim, block_size", GPU_SWEEP)
def test_matches_reference_gpu_sweep(dtype, head_dim, block_size) -> None:
    seqs = [(0, 1), (block_size - 1, 1), (700, 1), (2047, 1), (3000, 1)]
    batch = make_batch(
        seqs, num_kv_heads=4, group_size=8, head_dim=head_dim, block_size=block_size,
        dtype=dtype, seed=head_dim + block_size,
    )  # fmt: skip
    _check(batch, dtype, 512)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"query": lambda b: b.query[:, :3]}, "multiple of num_kv_heads"),
        ({"partition_size": lambda b: 100}, "partition_size"),
        (
            {"block_tables": lambda b: b.meta.block_tables[:, :1], "max_seq_len": lambda b: 40},
            "too few",
        ),
        ({"block_tables": lambda b: b.meta.block_tables.float()}, "block_tables must have dtype"),
        ({"seq_lens": lambda b: b.meta.seq_lens[None]}, "seq_lens must be"),
    ],
)
def test_rejects_bad_inputs_with_clear_errors(override, message) -> None:
    batch = make_batch(
        [(5, 1)], num_kv_heads=2, group_size=2, head_dim=64, block_size=16, dtype=torch.float32
    )
    m = batch.meta
    kwargs = {
        "query": batch.query, "key_cache": batch.key_cache, "value_cache": batch.value_cache,
        "block_tables": m.block_tables, "seq_lens": m.seq_lens, "max_seq_len": m.max_seq_len,
        "scale": 1.0,
    }  # fmt: skip
    kwargs.update({name: make(batch) for name, make in override.items()})
    with pytest.raises(ValueError, match=message):
        paged_decode(**kwargs)
