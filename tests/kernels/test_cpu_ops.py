"""The fused CPU kernels (``worker/kernels/cpu_ops.cpp``) equal the torch code they replace:
paged decode attention against the oracle, RMSNorm to rounding, RoPE bit for bit — every test
once per instruction-set variant this CPU can run (AVX-512, AVX2, portable: the ``ops`` fixture
in ``tests/conftest.py``), so a developer's AVX-512 machine also covers what AVX2-only and ARM
users run."""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch

from tests.kernels.kernel_cases import make_batch, poison_dead_slots, reference_output
from worker.attention.torch_backend import TorchAttentionBackend
from worker.kernels import cpu_ops
from worker.models.llama import RMSNorm, apply_rope

# Turned off on purpose (PAGEDSERVE_CPU_KERNELS=0): nothing to compare. Otherwise a failed build
# is a failure here, not a silent fallback (the torch path is covered by its own tests).
pytestmark = pytest.mark.skipif(os.environ.get("PAGEDSERVE_CPU_KERNELS", "1") == "0",
                                reason="fused CPU kernels turned off (PAGEDSERVE_CPU_KERNELS=0)")


def test_the_fused_kernels_build_on_this_machine() -> None:
    assert cpu_ops.library() is not None, "cpu_ops failed to build; see the warning in the log"
    assert "portable" in cpu_ops.available_isas()
    assert cpu_ops.selected_isa() == cpu_ops.available_isas()[0]


def test_the_variant_is_chosen_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for isa in cpu_ops.available_isas():
        monkeypatch.setenv("PAGEDSERVE_CPU_ISA", isa)
        assert cpu_ops.selected_isa() == isa
        assert cpu_ops.load().isa == isa
    monkeypatch.setenv("PAGEDSERVE_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="want one of avx512, avx2, portable"):
        cpu_ops.selected_isa()
    missing = [isa for isa in cpu_ops.ISAS if isa not in cpu_ops.available_isas()]
    for isa in missing:  # never a silent fall-back to a slower variant
        monkeypatch.setenv("PAGEDSERVE_CPU_ISA", isa)
        with pytest.raises(ValueError, match="this CPU runs only"):
            cpu_ops.selected_isa()

DECODE_SEQS = [(0, 1), (3, 1), (15, 1), (16, 1), (40, 1), (100, 1), (255, 1)]


@pytest.mark.parametrize("head_dim", [64, 32])  # 64: the AVX-512 path where there is one
@pytest.mark.parametrize("group_size", [1, 3, 8])
def test_paged_decode_matches_reference(ops: ModuleType, head_dim: int, group_size: int) -> None:
    batch = make_batch(DECODE_SEQS, num_kv_heads=2, group_size=group_size, head_dim=head_dim,
                       block_size=16, dtype=torch.float32)
    expected = reference_output(batch)
    poison_dead_slots(batch)  # the kernel must never read past a sequence's length
    got = ops.paged_decode(batch.query, batch.key_cache, batch.value_cache,
                           batch.meta.block_tables, batch.meta.seq_lens, batch.scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_paged_decode_reads_strided_query_rows(ops: ModuleType) -> None:
    """The model passes q as a view into the fused qkv rows (row stride > heads * head_dim)."""
    batch = make_batch(DECODE_SEQS, num_kv_heads=3, group_size=3, head_dim=64, block_size=16,
                       dtype=torch.float32)
    wide = torch.randn(batch.query.shape[0], 15 * 64)
    wide[:, : 9 * 64] = batch.query.reshape(-1, 9 * 64)
    query = wide[:, : 9 * 64].view(-1, 9, 64)
    got = ops.paged_decode(query, batch.key_cache, batch.value_cache, batch.meta.block_tables,
                           batch.meta.seq_lens, batch.scale)
    torch.testing.assert_close(got, reference_output(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_rms_norm_matches_torch(ops: ModuleType, num_tokens: int) -> None:
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576))
    x = torch.randn(num_tokens, 576) * 3
    x32 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    expected = norm.weight * x32
    torch.testing.assert_close(ops.rms_norm(x, norm.weight.detach(), 1e-5), expected,
                               atol=1e-6, rtol=1e-6)


def test_rope_in_place_is_bit_exact(ops: ModuleType) -> None:
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


@pytest.mark.parametrize("num_rows", [1, 5, 8, 9, 64, 300])
@pytest.mark.parametrize(("out_features", "in_features"),
                         [(960, 576), (576, 1536), (100, 70), (17, 1100), (49, 3)])
def test_packed_linear_matches_torch(ops: ModuleType, num_rows: int, out_features: int,
                                     in_features: int) -> None:
    """Every row tile (1-8 rows), column padding (N not a multiple of 48) and K chunking
    (K > 768) path."""
    weight = torch.randn(out_features, in_features) / in_features**0.5
    x = torch.randn(num_rows, in_features)
    got = ops.packed_linear(x, cpu_ops.pack_weight(weight), torch.empty(0), out_features)
    torch.testing.assert_close(got, x @ weight.T, atol=2e-5, rtol=1e-5)


def test_packed_linear_adds_bias_and_reads_strided_rows(ops: ModuleType) -> None:
    weight, bias = torch.randn(200, 64), torch.randn(200)
    wide = torch.randn(13, 100)
    x = wide[:, 10:74]  # rows 100 floats apart
    got = ops.packed_linear(x, cpu_ops.pack_weight(weight), bias, 200)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias),
                               atol=2e-5, rtol=1e-5)


def test_packed_linear_rows_do_not_depend_on_the_batch(ops: ModuleType) -> None:
    """Each output is the sum over k in order, whatever the batch: a sequence's logits are the
    same alone or in a batch of 37."""
    weight = cpu_ops.pack_weight(torch.randn(300, 576))
    x = torch.randn(37, 576)
    batched = ops.packed_linear(x, weight, torch.empty(0), 300)
    for row in (0, 8, 36):
        alone = ops.packed_linear(x[row : row + 1], weight, torch.empty(0), 300)
        assert torch.equal(alone[0], batched[row])


def test_packed_linear_refuses_a_mismatched_weight(ops: ModuleType) -> None:
    packed = cpu_ops.pack_weight(torch.randn(96, 32))
    with pytest.raises(RuntimeError, match="does not match"):
        ops.packed_linear(torch.randn(4, 33), packed, torch.empty(0), 96)
    with pytest.raises(RuntimeError, match="does not match"):
        ops.packed_linear(torch.randn(4, 32), packed, torch.empty(0), 200)


def _gguf_weight(kind: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A weight as a GGUF model's loader hands it over: quantized by gguf-py's own quantizer
    (llama.cpp's algorithm), dequantized to fp32."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    kind_ = GGMLQuantizationType[kind]
    raw = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    return torch.from_numpy(np.ascontiguousarray(dequantize(quantize(raw, kind_), kind_),
                                                 dtype=np.float32))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_weights_from_gguf_quantizations_get_exact_codes(kind: str) -> None:
    weight = _gguf_weight(kind, 100, 256)
    codes = cpu_ops.weight_codes(weight)
    assert codes is not None
    packed_codes, scales = codes
    assert packed_codes.dtype == torch.uint8 and packed_codes.shape == (3, 256, 48)
    assert scales.shape == (3, 256 // 32, 2, 48)
    # the codes rebuild the weight: panel p, column j, k -> weight[48 p + j, k]
    d = scales[:, :, 0, :].repeat_interleave(32, dim=1)  # [P, K, 48]
    m = scales[:, :, 1, :].repeat_interleave(32, dim=1)
    rebuilt = (packed_codes.float() * d + m).transpose(1, 2).reshape(-1, 256)[:100]
    assert torch.equal(rebuilt, weight)


def test_weights_without_an_exact_code_keep_their_fp32_panels() -> None:
    assert cpu_ops.weight_codes(torch.randn(96, 64)) is None  # trained-like fp32 values
    assert cpu_ops.weight_codes(_gguf_weight("Q4_1", 96, 64)[:, :40]) is None  # K % 32 != 0
    nudged = _gguf_weight("Q4_1", 96, 256)
    nudged[50, 200] = torch.nextafter(nudged[50, 200], torch.tensor(1.0))  # one ulp off a level
    assert cpu_ops.weight_codes(nudged) is None
    assert cpu_ops.weight_codes(_gguf_weight("Q8_0", 96, 256).double()) is None  # not fp32


@pytest.mark.parametrize("num_rows", [1, 3, 4, 5, 8, 9, 17, 64, 300])
@pytest.mark.parametrize(("kind", "out_features", "in_features"),
                         [("Q4_1", 960, 576), ("Q8_0", 100, 1536), ("Q4_0", 17, 64)])
def test_codes_linear_gives_the_bits_of_the_fp32_panels(ops: ModuleType, num_rows: int,
                                                        kind: str, out_features: int,
                                                        in_features: int) -> None:
    """Every row tile (a first tile that keeps the rebuilt weights for the next ones), column
    padding and K > 768 (where the fp32 path chunks k): the same FMA chain, the same bits."""
    weight = _gguf_weight(kind, out_features, in_features)
    codes = cpu_ops.weight_codes(weight)
    assert codes is not None
    x = torch.randn(num_rows, in_features)
    expected = ops.packed_linear(x, cpu_ops.pack_weight(weight), torch.empty(0), out_features)
    got = ops.codes_linear(x, *codes, torch.empty(0), out_features)
    assert torch.equal(got, expected)
    # and the dispatch: codes when a weight has them, panels when not
    assert torch.equal(ops.linear(x, torch.empty(0), *codes, torch.empty(0), out_features),
                       expected)
    none = (torch.empty(0, dtype=torch.uint8), torch.empty(0))
    assert torch.equal(ops.linear(x, cpu_ops.pack_weight(weight), *none, torch.empty(0),
                                  out_features), expected)


def test_codes_linear_adds_bias_reads_strided_rows_and_refuses_a_mismatch(
        ops: ModuleType) -> None:
    weight, bias = _gguf_weight("Q4_1", 200, 64), torch.randn(200)
    codes = cpu_ops.weight_codes(weight)
    assert codes is not None
    x = torch.randn(13, 100)[:, 10:74]  # rows 100 floats apart
    assert torch.equal(ops.codes_linear(x, *codes, bias, 200),
                       ops.packed_linear(x, cpu_ops.pack_weight(weight), bias, 200))
    with pytest.raises(RuntimeError, match="do not match"):
        ops.codes_linear(torch.randn(4, 96), *codes, torch.empty(0), 200)
    with pytest.raises(RuntimeError, match="do not match"):
        ops.codes_linear(torch.randn(4, 64), *codes, torch.empty(0), 300)


@pytest.mark.parametrize("num_tokens", [1, 3, 64])
@pytest.mark.parametrize("intermediate", [1536, 40])  # 40: the 16-lane body and a scalar tail
def test_silu_mul_matches_torch(ops: ModuleType, num_tokens: int, intermediate: int) -> None:
    gate_up = torch.randn(num_tokens, 2 * intermediate) * 6
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # exp under/overflow stays finite
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate_up), torch.nn.functional.silu(gate) * up,
                               atol=1e-5, rtol=2e-6)


# (cached context, new tokens): plain prompts, prompts over a cached prefix (mid-block and
# block-aligned), a 130-token prompt (three query blocks of 64) and decode rows between them.
MIXED_SEQS = [(0, 5), (0, 70), (13, 1), (40, 30), (16, 16), (100, 1), (0, 130), (7, 2)]


@pytest.mark.parametrize("head_dim", [64, 32, 80, 128])
@pytest.mark.parametrize("group_size", [1, 3])
def test_backend_prefill_and_decode_through_the_fused_kernels(ops: ModuleType, head_dim: int,
                                                             group_size: int) -> None:
    batch = make_batch(MIXED_SEQS, num_kv_heads=2, group_size=group_size, head_dim=head_dim,
                       block_size=16, dtype=torch.float32)
    expected = reference_output(batch)
    poison_dead_slots(batch)
    got = TorchAttentionBackend().forward(batch.query, batch.key_cache, batch.value_cache,
                                          batch.meta, batch.scale)
    assert batch.meta.scratch["torch_plan"].fused_prefill is not None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_prefill_attention_rejects_inconsistent_lengths(ops: ModuleType) -> None:
    batch = make_batch([(0, 20)], num_kv_heads=1, group_size=2, head_dim=64, block_size=16,
                       dtype=torch.float32)
    out = torch.empty_like(batch.query)
    table = batch.meta.block_tables
    with pytest.raises(RuntimeError, match="bad lengths"):  # 21 new tokens in a 20-token context
        ops.prefill_attention(batch.query, batch.key_cache, batch.value_cache, table,
                              torch.tensor([20]), torch.tensor([0]), torch.tensor([21]), 0.125,
                              out)


def test_kernels_release_the_gil_while_they_compute(ops: ModuleType) -> None:
    """A step's matmuls must not stall the other threads of the process (the worker's gRPC
    loop, or router and scheduler in a local cluster): Python runs while the kernel computes."""
    import threading
    import time

    weight = cpu_ops.pack_weight(torch.randn(4096, 1024))
    x = torch.randn(2048, 1024)  # one call of ~17 GFLOP: tens of milliseconds
    span: list[float] = []

    def compute() -> None:
        span.append(time.perf_counter())
        ops.packed_linear(x, weight, torch.empty(0), 4096)
        span.append(time.perf_counter())

    thread = threading.Thread(target=compute)
    ticks: list[float] = []
    thread.start()
    while thread.is_alive():
        ticks.append(time.perf_counter())
    thread.join()
    start, end = span
    margin = (end - start) / 5  # the middle of the call: no switch point of the thread there
    inside = [t for t in ticks if start + margin < t < end - margin]
    assert end - start > 0.01
    assert len(inside) > 100, f"main thread ran {len(inside)} times in {end - start:.3f}s"
