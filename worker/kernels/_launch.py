"""Input checks shared by the kernel launchers.

Triton kernels trust their pointers and strides: a wrong shape or dtype reads the wrong memory
instead of failing. Every launcher therefore validates on the host, with messages that name the
argument and say what was expected, and raises ``ValueError`` (never ``assert``, which ``-O``
removes). Checks use only shapes, dtypes, strides and host ints: none of them syncs the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def padded_head_dim(head_dim: int) -> int:
    """Head dims are padded (and masked) to a power of two of at least 16, the ``tl.dot``
    minimum."""
    return max(16, next_power_of_2(head_dim))


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(kernel: object, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    device = next(iter(devices.values()))
    if device.type != "cuda" and not is_interpreted(kernel):
        raise ValueError(
            f"Triton kernels need CUDA tensors, got device {device}; on CPU use the torch "
            "backend, or set TRITON_INTERPRET=1 before importing worker.kernels (tests only)"
        )


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{name} must have dtype in {list(allowed)}, got {t.dtype}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {layout} ({ndim}-D), got shape {tuple(t.shape)}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous along its last dim (stride 1), got strides {t.stride()}"
        )


def check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, int, int]:
    """Validates the ``[num_blocks, block_size, num_kv_heads, head_dim]`` pair.

    Returns ``(block_size, num_kv_heads, head_dim)``. K and V must agree in shape, dtype and
    strides, because the kernels address both with one set of strides.
    """
    layout = "[num_blocks, block_size, num_kv_heads, head_dim]"
    check_ndim("key_cache", key_cache, 4, layout)
    check_ndim("value_cache", value_cache, 4, layout)
    if key_cache.shape != value_cache.shape:
        raise ValueError(
            f"key_cache and value_cache shapes differ: {tuple(key_cache.shape)} vs "
            f"{tuple(value_cache.shape)}"
        )
    check_dtype("key_cache", key_cache, CACHE_DTYPES)
    if value_cache.dtype != key_cache.dtype:
        raise ValueError(
            f"key_cache and value_cache dtypes differ: {key_cache.dtype} vs {value_cache.dtype}"
        )
    if key_cache.stride() != value_cache.stride():
        raise ValueError(
            f"key_cache and value_cache strides differ: {key_cache.stride()} vs "
            f"{value_cache.stride()}"
        )
    check_last_dim_contiguous("key_cache", key_cache)
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    check_head_dim(head_dim)
    return block_size, num_kv_heads, head_dim


def check_head_dim(head_dim: int) -> None:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")


def check_query(
    query: torch.Tensor, key_cache: torch.Tensor, num_kv_heads: int, head_dim: int
) -> int:
    """Validates ``[num_tokens, num_heads, head_dim]`` against the cache; returns the GQA group
    size."""
    check_ndim("query", query, 3, "[num_tokens, num_heads, head_dim]")
    check_dtype("query", query, CACHE_DTYPES)
    check_last_dim_contiguous("query", query)
    if query.shape[2] != head_dim:
        raise ValueError(f"query head_dim {query.shape[2]} != cache head_dim {head_dim}")
    num_heads = query.shape[1]
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}) for GQA"
        )
    return num_heads // num_kv_heads


def check_block_tables(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    num_seqs: int,
    block_size: int,
    max_seq_len: int,
) -> None:
    check_ndim("block_tables", block_tables, 2, "[num_seqs, max_blocks_per_seq]")
    check_dtype("block_tables", block_tables, INDEX_DTYPES)
    check_ndim("seq_lens", seq_lens, 1, "[num_seqs]")
    check_dtype("seq_lens", seq_lens, INDEX_DTYPES)
    if not seq_lens.is_contiguous():
        raise ValueError("seq_lens must be contiguous")
    if seq_lens.shape[0] != num_seqs or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"expected {num_seqs} sequences, got seq_lens {tuple(seq_lens.shape)} and "
            f"block_tables {tuple(block_tables.shape)}"
        )
    if block_tables.shape[1] * block_size < max_seq_len:
        raise ValueError(
            f"block_tables has {block_tables.shape[1]} columns of {block_size} tokens, too few "
            f"for max_seq_len {max_seq_len}"
        )
