"""Triton paged attention: the CUDA backend, a drop-in for ``TorchAttentionBackend``.

Same interface and semantics as ``torch_backend.py`` (its oracle): K/V are written only through
the slot mapping and read only through the block tables (see ``metadata.py``). A decode-only
step goes to the flash-decoding kernel; anything else (prefill, chunked prefill, prefix-cached
extend, mixed batches) goes to the prefill kernel, which reads every K/V, the new tokens'
included, from the cache — so ``write_kv`` must run before ``forward`` in each layer.

Importing this module needs neither CUDA nor Triton: the kernels are imported when the backend
is constructed, so ``--attention-backend auto`` can import it anywhere and pick it only on CUDA.
"""

from __future__ import annotations

from types import ModuleType

import torch

from worker.attention.metadata import AttentionMetadata


class TritonAttentionBackend:
    """Stateless apart from the kernel modules it binds; safe to share between layers."""

    name = "triton"

    def __init__(self, decode_partition_size: int | None = None) -> None:
        self._cache_op, self._decode, self._prefill = _import_kernels()
        self._partition_size = decode_partition_size or self._decode.DEFAULT_PARTITION_SIZE

    def write_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens] int64, negative = padding
    ) -> None:
        self._cache_op.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if meta.block_size != key_cache.shape[1]:
            raise ValueError(
                f"meta.block_size {meta.block_size} != cache block size {key_cache.shape[1]}"
            )
        if meta.is_decode_only:
            if query.shape[0] != meta.num_seqs:
                raise ValueError(
                    f"decode-only step needs one query per sequence: {query.shape[0]} tokens "
                    f"for {meta.num_seqs} sequences"
                )
            return self._decode.paged_decode(
                query, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                meta.max_seq_len, scale, partition_size=self._partition_size,
            )  # fmt: skip
        return self._prefill.prefill_attention(
            query, key_cache, value_cache, meta.block_tables, meta.seq_lens,
            meta.query_start_loc, meta.max_query_len, meta.max_seq_len, scale,
        )  # fmt: skip


def _import_kernels() -> tuple[ModuleType, ModuleType, ModuleType]:
    try:
        from worker.kernels import paged_decode, prefill_attention, reshape_and_cache
    except ImportError as exc:  # e.g. no Triton wheel for this platform
        raise RuntimeError(
            f"the triton attention backend needs the triton package ({exc}); "
            "use --attention-backend torch"
        ) from exc
    return reshape_and_cache, paged_decode, prefill_attention
