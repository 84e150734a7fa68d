"""The fused CPU kernels (``worker/kernels/cpu_ops.cpp``) equal the torch code they replace:
paged decode attention against the oracle, RMSNorm to rounding, RoPE bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

from tests.kernels.kernel_cases import make_batch, poison_dead_slots, reference_output
from worker.kernels import cpu_ops
from worker.models.llama import RMSNorm, apply_rope

ops = cpu_ops.load()
# Turned off on purpose (PAGEDSERVE_CPU_KERNELS=0): nothing to compare. Otherwise a failed build
# is a failure here, not a silent fallback (the torch path is covered by its own tests).
pytestmark = pytest.mark.skipif(os.environ.get("PAGEDSERVE_CPU_KERNELS", "1") == "0",
                                reason="fused CPU kernels turned off (PAGEDSERVE_CPU_KERNELS=0)")


def test_the_fused_kernels_build_on_this_machine():
    assert ops is not None, "cpu_ops failed to build; see the warning in the log"

DECODE_SEQS = [(0, 1), (3, 1), (15, 1), (16, 1), (40, 1), (100, 1), (255, 1)]


@pytest.mark.parametrize("head_dim", [64, 32])  # 64: the AVX-512 path where there is one
@pytest.mark.parametrize("group_size", [1, 3, 8])
def test_paged_decode_matches_reference(head_dim: int, group_size: int) -> None:
    assert ops is not None
    batch = make_batch(DECODE_SEQS, num_kv_heads=2, group_size=group_size, head_dim=head_dim,
                       block_size=16, dtype=torch.float32)
    expected = reference_output(batch)
    poison_dead_slots(batch)  # the kernel must never read past a sequence's length
    got = ops.paged_decode(batch.query, batch.key_cache, batch.value_cache,
                           batch.meta.block_tables, batch.meta.seq_lens, batch.scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_paged_decode_reads_strided_query_rows() -> None:
    """The model passes q as a view into the fused qkv rows (row stride > heads * head_dim)."""
    assert ops is not None
    batch = make_batch(DECODE_SEQS, num_kv_heads=3, group_size=3, head_dim=64, block_size=16,
                       dtype=torch.float32)
    wide = torch.randn(batch.query.shape[0], 15 * 64)
    wide[:, : 9 * 64] = batch.query.reshape(-1, 9 * 64)
    query = wide[:, : 9 * 64].view(-1, 9, 64)
    got = ops.paged_decode(query, batch.key_cache, batch.value_cache, batch.meta.block_tables,
                           batch.meta.seq_lens, batch.scale)
    torch.testing.assert_close(got, reference_output(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_rms_norm_matches_torch(num_tokens: int) -> None:
    assert ops is not None
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576))
    x = torch.randn(num_tokens, 576) * 3
    x32 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    expected = norm.weight * x32
    torch.testing.assert_close(ops.rms_norm(x, norm.weight.detach(), 1e-5), expected,
                               atol=1e-6, rtol=1e-6)


def test_rope_in_place_is_bit_exact() -> None:
    assert ops is not None
    num_tokens, heads, kv_heads, head_dim = 37, 9, 3, 64
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim)
    positions = torch.randint(0, 4096, (num_tokens,))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    expected_q = apply_rope(qkv[:, :q_size].view(-1, heads, head_dim), cos, sin)
    expected_k = apply_rope(qkv[:, q_size : q_size + kv_size].view(-1, kv_heads, head_dim),
                            cos, sin)
    v_before = qkv[:, q_size + kv_size :].clone()
    ops.rope_(qkv, cos, sin, heads + kv_heads, head_dim)
    assert torch.equal(qkv[:, :q_size].view(-1, heads, head_dim), expected_q)
    assert torch.equal(qkv[:, q_size : q_size + kv_size].view(-1, kv_heads, head_dim), expected_k)
    assert torch.equal(qkv[:, q_size + kv_size :], v_before)
