"""The CPU attention path (planned, bucketed, workspace-reusing) equals the torch oracle
``paged_attention_reference`` on every kind of step the scheduler builds."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.kernel_cases import make_batch, reference_output
from worker.attention import torch_backend
from worker.attention.torch_backend import DECODE_BUCKET, TorchAttentionBackend

CASES = {
    "prefill_only": [(0, 5), (0, 17), (0, 33)],
    "decode_only": [(3, 1), (40, 1), (16, 1), (0, 1), (100, 1)],
    "decode_many_buckets": [((i * 37) % 150, 1) for i in range(2 * DECODE_BUCKET + 3)],
    "mixed_chunked_prefill": [(20, 7), (0, 33), (5, 1), (64, 1), (31, 2), (48, 16)],
    "full_blocks": [(15, 1), (31, 1), (16, 16)],
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
def test_backend_matches_reference(name: str, group_size: int, fused: bool,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``fused``: decode rows go through the C++ kernel when it builds; ``torch``: the bucketed
    torch path that every machine falls back to."""
    if not fused:
        monkeypatch.setattr(torch_backend, "_fused_ops", lambda *_: None)
    seqs = CASES[name]
    backend = TorchAttentionBackend()
    for shared in (0, 1):
        if shared and any(ctx < 16 for ctx, _ in seqs):
            continue
        batch = make_batch(seqs, num_kv_heads=2, group_size=group_size, head_dim=32,
                           block_size=16, dtype=torch.float32, num_shared_blocks=shared)
        expected = reference_output(batch)
        got = backend.forward(batch.query, batch.key_cache, batch.value_cache, batch.meta,
                              batch.scale)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # The plan is memoized per step: a second layer reuses it and gets the same answer.
        assert "torch_plan" in batch.meta.scratch
        again = backend.forward(batch.query, batch.key_cache, batch.value_cache, batch.meta,
                                batch.scale)
        torch.testing.assert_close(again, expected, atol=1e-5, rtol=1e-5)
