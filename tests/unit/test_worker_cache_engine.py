"""CacheEngine moves exactly the blocks it is told to, in every layer, K and V, and nothing else."""

from __future__ import annotations

import pytest
import torch

from pagedserve.core.errors import InvalidArgument
from worker.cache_engine import CacheEngine, block_bytes
from worker.models.config import ModelConfig

CONFIG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=4)


def _engine() -> CacheEngine:
    engine = CacheEngine(CONFIG, block_size=4, num_gpu_blocks=8, num_cpu_blocks=6,
                         dtype=torch.float32, device=torch.device("cpu"))
    for layer, (k, v) in enumerate(engine.gpu_cache):  # block b holds value b (+ layer/kv tags)
        for b in range(8):
            k[b] = 100 * layer + b
            v[b] = 100 * layer + b + 0.5
    return engine


def _snapshot(caches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    return [t.clone() for kv in caches for t in kv]


def test_block_bytes_counts_k_and_v_of_every_layer() -> None:
    assert block_bytes(CONFIG, 4, torch.float16) == 2 * 2 * 4 * 2 * 4 * 2


def test_copy_blocks_copies_only_named_destinations() -> None:
    engine = _engine()
    before = _snapshot(engine.gpu_cache)
    engine.copy_blocks([(1, 5), (2, 6)])
    for i, t in enumerate(_snapshot(engine.gpu_cache)):
        expected = before[i].clone()
        expected[5], expected[6] = before[i][1], before[i][2]
        assert torch.equal(t, expected)


def test_copies_read_the_pre_step_state_when_chained() -> None:
    engine = _engine()
    before = _snapshot(engine.gpu_cache)
    engine.copy_blocks([(1, 2), (2, 3)])
    k0 = engine.gpu_cache[0][0]
    assert torch.equal(k0[2], before[0][1]) and torch.equal(k0[3], before[0][2])


def test_swap_out_then_in_round_trips_named_blocks_only() -> None:
    engine = _engine()
    gpu_before = _snapshot(engine.gpu_cache)
    engine.swap_out([(3, 0), (7, 4)])
    cpu = _snapshot(engine.cpu_cache)
    for i in range(len(cpu)):
        assert torch.equal(cpu[i][0], gpu_before[i][3]) and torch.equal(cpu[i][4], gpu_before[i][7])
        assert not cpu[i][[1, 2, 3, 5]].any(), "untouched host blocks stay zero"
    gpu_after = _snapshot(engine.gpu_cache)
    assert all(torch.equal(a, b) for a, b in zip(gpu_after, gpu_before, strict=True))

    engine.swap_in([(4, 1), (0, 2)])
    after = _snapshot(engine.gpu_cache)
    for i in range(len(after)):
        expected = gpu_before[i].clone()
        expected[1], expected[2] = gpu_before[i][7], gpu_before[i][3]
        assert torch.equal(after[i], expected)


@pytest.mark.parametrize(
    "op, pairs",
    [("copy_blocks", [(0, 8)]), ("swap_out", [(0, 6)]), ("swap_in", [(6, 0)]),
     ("copy_blocks", [(0, 1), (2, 1)]), ("swap_in", [(-1, 0)])],
)
def test_out_of_range_or_duplicate_destinations_are_refused_before_moving(
    op: str, pairs: list
) -> None:
    engine = _engine()
    before = _snapshot(engine.gpu_cache) + _snapshot(engine.cpu_cache)
    with pytest.raises(InvalidArgument):
        getattr(engine, op)(pairs)
    after = _snapshot(engine.gpu_cache) + _snapshot(engine.cpu_cache)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
