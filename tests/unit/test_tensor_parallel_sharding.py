"""Megatron sharding (``worker/models/sharding.py``): which heads each rank holds, and a model cut
into rank slices whose row-parallel outputs are summed computes the whole model's function
within fp32 rounding, on the torch path and on the ``cpu_ops`` path (packed projections keep the
all-reduce). The all-reduce here is a fake that sums the ranks' tensors in process: each rank's
forward runs in its own thread and meets the others at every reduction."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from protos.pagedserve.v1 import common_pb2
from tests.support.tiny_llama import tiny_llama_dir
from worker.attention.torch_backend import TorchAttentionBackend
from worker.cache_engine import CacheEngine, block_bytes
from worker.kernels import cpu_ops
from worker.model_runner import ModelRunner, ScheduledWork
from worker.models.config import ModelConfig
from worker.models.execution import ExecutionPath
from worker.models.llama import LlamaForCausalLM
from worker.models.loader import load_model
from worker.models.sharding import TensorShard, head_slice, shard_config
from worker.sampler import ResolvedParams, Sampler
from worker.sequence_state import SequenceState

BS = 4
TOL = 1e-4


def _config(heads: int, kv_heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=heads * 8, intermediate_size=30, num_layers=1,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=8)


@pytest.mark.parametrize("heads, kv_heads, size, expected", [
    (9, 3, 2, [(0, 6, 0, 2), (6, 9, 2, 3)]),  # SmolLM2: KV heads split 2 + 1
    (4, 2, 2, [(0, 2, 0, 1), (2, 4, 1, 2)]),
    (4, 1, 2, [(0, 2, 0, 1), (2, 4, 0, 1)]),  # one KV head, replicated on both ranks
    (8, 2, 4, [(0, 2, 0, 1), (2, 4, 0, 1), (4, 6, 1, 2), (6, 8, 1, 2)]),
])
def test_heads_are_cut_on_kv_group_boundaries(heads, kv_heads, size, expected) -> None:
    config = _config(heads, kv_heads)
    slices = [head_slice(config, TensorShard(r, size)) for r in range(size)]
    assert [(s.q_start, s.q_stop, s.kv_start, s.kv_stop) for s in slices] == expected
    shards = [shard_config(config, TensorShard(r, size)) for r in range(size)]
    assert sum(s.intermediate_size for s in shards) == config.intermediate_size
    assert sum(s.num_heads for s in shards) == heads


def test_a_group_size_that_cannot_cut_the_heads_is_refused() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size 4"):
        shard_config(_config(9, 3), TensorShard(0, 4))


def test_each_rank_pool_holds_only_its_kv_heads() -> None:
    config = _config(9, 3)
    whole = block_bytes(config, 16, torch.float32)
    per_rank = [block_bytes(shard_config(config, TensorShard(r, 2)), 16, torch.float32)
                for r in range(2)]
    assert per_rank == [whole * 2 // 3, whole // 3]


class FakeAllReduce:
    """Sums a tensor over ``size`` threads in place (a barrier per reduction)."""

    def __init__(self, size: int) -> None:
        self.parts: list[torch.Tensor | None] = [None] * size
        self.barrier = threading.Barrier(size)

    def for_rank(self, rank: int):  # type: ignore[no-untyped-def]
        def all_reduce(x: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = x.clone()
            self.barrier.wait()
            total = torch.stack([p for p in self.parts if p is not None]).sum(0)
            self.barrier.wait()
            x.copy_(total)
            return x
        return all_reduce


def _runner(model: LlamaForCausalLM, path: ExecutionPath, size: int) -> ModelRunner:
    return ModelRunner(model, Sampler(model.config.eos_token_ids), BS, torch.device("cpu"),
                       path=path, tensor_parallel_size=size)


def _hidden(runner: ModelRunner, prompts: list[list[int]]) -> torch.Tensor:
    """Final hidden states of a prefill of ``prompts`` and then one decode token each."""
    params = ResolvedParams.from_proto(common_pb2.SamplingParams())
    cache = CacheEngine(runner.model.config, BS, 32, 0, torch.float32, torch.device("cpu"))
    seqs = []
    for i, p in enumerate(prompts):
        seq = SequenceState(i, p, len(p), params)
        seq.block_table = list(range(8 * i, 8 * i + 8))
        seqs.append(seq)
    outs = []
    with torch.inference_mode():
        for work in ([ScheduledWork(s, 0, s.num_tokens - 1, False) for s in seqs],
                     [ScheduledWork(s, s.num_tokens - 1, 1, False) for s in seqs]):
            inputs = runner.prepare(work)
            outs.append(runner.execution.forward(inputs.input_ids, inputs.positions,
                                                 cache.gpu_cache, inputs.meta))
    return torch.cat(outs)


def _sharded_hidden(path: str, size: int, exec_path: ExecutionPath,
                    prompts: list[list[int]]) -> list[torch.Tensor]:
    reduce = FakeAllReduce(size)
    results: list[torch.Tensor | None] = [None] * size

    def rank(r: int) -> None:
        model, _ = load_model(path, torch.float32, "cpu", TorchAttentionBackend(),
                              TensorShard(r, size, computes_logits=r == 0))
        model.use_all_reduce(reduce.for_rank(r))
        results[r] = _hidden(_runner(model, exec_path, size), prompts)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-split", "kv-replicated"])
@pytest.mark.parametrize("exec_path", [ExecutionPath.TORCH, ExecutionPath.CPU_OPS])
def test_sharded_model_after_all_reduce_equals_the_whole_one(kv_heads, exec_path) -> None:
    path = str(tiny_llama_dir(num_key_value_heads=kv_heads, attention_bias=True))
    prompts = [list(np.arange(3, 14) * 7 % 500 + 3), [9, 8, 7, 6, 5]]
    if exec_path is ExecutionPath.CPU_OPS and cpu_ops.load() is None:
        pytest.skip("C++ CPU kernels unavailable")
    whole, _ = load_model(path, torch.float32, "cpu", TorchAttentionBackend())
    expected = _hidden(_runner(whole, ExecutionPath.TORCH, 1), prompts)
    for got in _sharded_hidden(path, 2, exec_path, prompts):
        torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)


def test_the_follower_slice_has_no_logits_and_less_weight() -> None:
    path = str(tiny_llama_dir())
    whole, config = load_model(path, torch.float32, "cpu")
    ranks = [load_model(path, torch.float32, "cpu", None, TensorShard(r, 2, r == 0))[0]
             for r in range(2)]
    assert ranks[1].lm_head is None and not ranks[1].computes_logits
    with pytest.raises(RuntimeError, match="leader"):
        ranks[1].compute_logits(torch.zeros(1, config.hidden_size))

    def nbytes(m: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    assert nbytes(ranks[1]) < nbytes(ranks[0]) < nbytes(whole)
    assert replace(ranks[0].config, num_heads=4, num_kv_heads=2, intermediate_size=128) == config
