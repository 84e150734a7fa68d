"""Write one step's new K/V into their paged cache slots.

Token ``t`` goes to ``slot = slot_mapping[t]`` (see ``worker/attention/metadata.py``)::

    key[t, :, :] ──► key_cache[slot // block_size, slot % block_size, :, :]

A negative slot marks a padding token, which is skipped. One program copies one token's K and V
(all KV heads at once), converting to the cache dtype on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels import _launch


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_co,
    stride_ch,
    block_size,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, HEADS_PAD)[:, None]
        dims = tl.arange(0, DIM_PAD)[None, :]
        mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
        block = slot // block_size
        offset = slot % block_size
        cache_off = block * stride_cb + offset * stride_co + heads * stride_ch + dims
        k = tl.load(key_ptr + token.to(tl.int64) * stride_kt + heads * stride_kh + dims, mask=mask)
        v = tl.load(
            value_ptr + token.to(tl.int64) * stride_vt + heads * stride_vh + dims, mask=mask
        )
        tl.store(key_cache_ptr + cache_off, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(value_cache_ptr + cache_off, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64 (or int32), negative = padding
) -> None:
    """Scatters ``key``/``value`` into the caches in place.

    ``key``/``value`` may be strided views (e.g. slices of a fused QKV output) as long as
    ``head_dim`` is contiguous. Slots must be below ``num_blocks * block_size``; that is the
    scheduler's invariant and is not checked here (checking would sync the device).
    """
    block_size, num_kv_heads, head_dim = _launch.check_caches(key_cache, value_cache)
    _check_new_kv(key, value, slot_mapping, num_kv_heads, head_dim)
    _launch.check_device(
        _reshape_and_cache_kernel,
        key=key,
        value=value,
        key_cache=key_cache,
        value_cache=value_cache,
        slot_mapping=slot_mapping,
    )
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_size,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=_launch.next_power_of_2(num_kv_heads),
        DIM_PAD=_launch.next_power_of_2(head_dim),
    )


def _check_new_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    layout = "[num_tokens, num_kv_heads, head_dim]"
    _launch.check_ndim("key", key, 3, layout)
    _launch.check_ndim("value", value, 3, layout)
    expected = (key.shape[0], num_kv_heads, head_dim)
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape {expected} to match the cache, got {tuple(t.shape)}"
            )
        _launch.check_dtype(name, t, _launch.CACHE_DTYPES)
        _launch.check_last_dim_contiguous(name, t)
    _launch.check_dtype("slot_mapping", slot_mapping, _launch.INDEX_DTYPES)
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping must be [num_tokens={key.shape[0]}], got {tuple(slot_mapping.shape)}"
        )
    if not slot_mapping.is_contiguous():
        raise ValueError("slot_mapping must be contiguous")
