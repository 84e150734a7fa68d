"""TritonAttentionBackend is a drop-in for TorchAttentionBackend across a request's life."""

from __future__ import annotations

import importlib
import inspect

import torch

from tests.kernels.kernel_cases import DEVICE, assert_close, make_batch
from worker.attention.torch_backend import TorchAttentionBackend
from worker.attention.triton_backend import TritonAttentionBackend
from worker.kernels import _launch, paged_decode


def _step(backend, batch, new_key, new_value, key_cache, value_cache) -> torch.Tensor:
    backend.write_kv(new_key, new_value, key_cache, value_cache, batch.meta.slot_mapping)
    return backend.forward(batch.query, key_cache, value_cache, batch.meta, batch.scale)


def _compare_step(seqs, dtype, num_kv_heads=2, head_dim=64) -> None:
    batch = make_batch(
        seqs, num_kv_heads=num_kv_heads, group_size=2, head_dim=head_dim, block_size=16, dtype=dtype
    )
    num_tokens = batch.query.shape[0]
    gen = torch.Generator().manual_seed(1)
    new_key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    new_value = torch.randn_like(new_key)
    torch_caches = (batch.key_cache.clone(), batch.value_cache.clone())
    triton_caches = (batch.key_cache.clone(), batch.value_cache.clone())
    expected = _step(TorchAttentionBackend(), batch, new_key, new_value, *torch_caches)
    actual = _step(
        TritonAttentionBackend(decode_partition_size=64), batch, new_key, new_value, *triton_caches
    )
    assert torch.equal(triton_caches[0], torch_caches[0])
    assert torch.equal(triton_caches[1], torch_caches[1])
    assert_close(actual, expected, dtype)


def test_prefill_step_matches_torch_backend() -> None:
    _compare_step([(0, 20), (32, 5)], torch.float32)


def test_decode_step_matches_torch_backend() -> None:
    _compare_step([(3, 1), (150, 1)], torch.float16)


def test_decode_only_dispatches_to_decode_kernel(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(paged_decode, "paged_decode", lambda *a, **k: calls.append(a) or a[0])
    batch = make_batch(
        [(3, 1)], num_kv_heads=1, group_size=1, head_dim=64, block_size=16, dtype=torch.float32
    )
    TritonAttentionBackend().forward(
        batch.query, batch.key_cache, batch.value_cache, batch.meta, 1.0
    )
    assert len(calls) == 1


def test_interface_matches_torch_backend() -> None:
    assert TritonAttentionBackend.name == "triton"
    for method in ("write_kv", "forward"):
        triton_sig = inspect.signature(getattr(TritonAttentionBackend, method))
        torch_sig = inspect.signature(getattr(TorchAttentionBackend, method))
        assert list(triton_sig.parameters) == list(torch_sig.parameters)


def test_kernels_are_interpreted_without_cuda() -> None:
    # Guards the conftest: compiled-mode kernels cannot run on CPU tensors.
    module = importlib.import_module("worker.kernels.paged_decode")
    assert _launch.is_interpreted(module._decode_partition_kernel) == (
        not torch.cuda.is_available()
    )
