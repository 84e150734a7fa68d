"""reshape_and_cache writes K/V exactly where the slot mapping says, skipping padding slots."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.kernel_cases import DEVICE, GPU_SWEEP, requires_gpu
from worker.attention.torch_backend import write_kv_reference
from worker.kernels.reshape_and_cache import reshape_and_cache


def _run_case(
    new_dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int, block_size: int
) -> None:
    gen = torch.Generator().manual_seed(block_size)
    num_blocks, num_kv_heads, num_tokens = 6, 2, 9
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, generator=gen).to(cache_dtype).to(DEVICE)
    value_cache = torch.randn(cache_shape, generator=gen).to(cache_dtype).to(DEVICE)
    # K and V as strided views of one fused [tokens, 3 * kv_heads, head_dim] projection.
    fused = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=gen).to(new_dtype)
    key, value = fused.to(DEVICE).split(num_kv_heads, dim=1)[1:]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 5]] = -1  # padding tokens
    slots = slots.to(DEVICE)

    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    write_kv_reference(key, value, expected_k, expected_v, slots)
    reshape_and_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_k)
    assert torch.equal(value_cache, expected_v)


@pytest.mark.parametrize(
    "new_dtype, cache_dtype, head_dim, block_size",
    [
        (torch.float32, torch.float32, 80, 8),
        (torch.float16, torch.float16, 128, 32),
        (torch.float32, torch.float16, 64, 16),  # converts to the cache dtype on store
    ],
)
def test_writes_slots_and_skips_padding(new_dtype, cache_dtype, head_dim, block_size) -> None:
    _run_case(new_dtype, cache_dtype, head_dim, block_size)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("cache_dtype, head_dim, block_size", GPU_SWEEP)
def test_writes_slots_gpu_sweep(cache_dtype, head_dim, block_size) -> None:
    _run_case(cache_dtype, cache_dtype, head_dim, block_size)


def test_empty_step_is_a_no_op() -> None:
    cache = torch.zeros(2, 16, 1, 64, device=DEVICE)
    empty = torch.zeros(0, 1, 64, device=DEVICE)
    reshape_and_cache(
        empty, empty, cache, cache.clone(), torch.zeros(0, dtype=torch.long, device=DEVICE)
    )
    assert not cache.any()


@pytest.mark.parametrize(
    "change, message",
    [
        ("key_heads", "key must have shape"),
        ("slot_dtype", "slot_mapping must have dtype"),
        ("slot_len", "slot_mapping must be"),
        ("cache_dtype", "dtypes differ"),
        ("key_stride", "contiguous along its last dim"),
    ],
)
def test_rejects_bad_inputs_with_clear_errors(change: str, message: str) -> None:
    key = torch.zeros(4, 2, 64)
    value = torch.zeros(4, 2, 64)
    key_cache = torch.zeros(3, 16, 2, 64)
    value_cache = torch.zeros(3, 16, 2, 64)
    slots = torch.arange(4)
    if change == "key_heads":
        key = torch.zeros(4, 3, 64)
    elif change == "slot_dtype":
        slots = slots.float()
    elif change == "slot_len":
        slots = torch.arange(5)
    elif change == "cache_dtype":
        value_cache = value_cache.half()
    elif change == "key_stride":
        key = torch.zeros(4, 2, 128)[:, :, ::2]
    with pytest.raises(ValueError, match=message):
        reshape_and_cache(key, value, key_cache, value_cache, slots)
