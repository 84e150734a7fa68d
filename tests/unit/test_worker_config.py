"""WorkerConfig: CLI > env > defaults, and bad values are refused with a message saying what to
do."""

from __future__ import annotations

import argparse

import pytest

from worker.config import (
    CacheConfig,
    LoadConfig,
    ParallelConfig,
    WorkerConfig,
    add_worker_arguments,
    worker_config_from_args,
)
from worker.models.config import ModelConfig, RopeScaling


def _parse(argv: list[str]) -> WorkerConfig:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    return worker_config_from_args(parser.parse_args(argv))


def test_defaults() -> None:
    cfg = _parse([])
    assert cfg.cache.block_size == 16 and cfg.cache.kv_cache_memory_gib == 2.0
    assert cfg.cache.gpu_memory_utilization == 0.9 and cfg.cache.swap_space_gib == 1.0
    assert cfg.batch.max_num_batched_tokens == 2048 and cfg.batch.max_num_seqs == 256
    assert cfg.load.device == "auto" and cfg.load.attention_backend == "auto"
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 0


def test_cli_overrides_env_overrides_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_WORKER_BLOCK_SIZE", "32")
    monkeypatch.setenv("PAGEDSERVE_WORKER_NUM_GPU_BLOCKS", "10")
    cfg = _parse(["--block-size", "8"])
    assert cfg.cache.block_size == 8 and cfg.cache.num_gpu_blocks == 10


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: CacheConfig(block_size=12), "power of two"),
        (lambda: CacheConfig(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (lambda: LoadConfig(dtype="int3"), "dtype"),
        (lambda: LoadConfig(attention_backend="flash"), "attention_backend"),
        (lambda: WorkerConfig(load=LoadConfig(device="cpu", attention_backend="triton")), "CUDA"),
        (lambda: ParallelConfig(size=2), "--tensor-parallel-master"),
        (lambda: ParallelConfig(size=2, rank=2, master="h:1"), "tensor_parallel_rank"),
        (lambda: ParallelConfig(size=2, master="nohost"), "HOST:PORT"),
        (lambda: ParallelConfig(size=0), "tensor_parallel_size"),
        (lambda: ParallelConfig(timeout_s=0), "timeout"),
    ],
)
def test_bad_values_raise_value_error_naming_the_fix(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_hf_config_reads_old_and_new_rope_layouts_and_eos_lists() -> None:
    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": [3, 4]}
    old = ModelConfig.from_hf_dict({**base, "rope_theta": 5e5, "rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    new = ModelConfig.from_hf_dict({**base, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert old == new and old.rope_theta == 5e5 and old.eos_token_ids == (3, 4)
    assert old.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert old.num_kv_heads == 2 and old.head_dim == 4
    qwen = ModelConfig.from_hf_dict({**base, "model_type": "qwen2"})
    assert qwen.attention_bias


def test_unsupported_rope_scaling_is_refused() -> None:
    with pytest.raises(ValueError, match="not supported"):
        RopeScaling(rope_type="yarn")


def test_tensor_parallel_flags_default_to_a_whole_worker_and_read_the_env(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert _parse([]).parallel == ParallelConfig(1, 0, None, 30.0)
    monkeypatch.setenv("PAGEDSERVE_WORKER_TENSOR_PARALLEL_SIZE", "2")
    monkeypatch.setenv("PAGEDSERVE_WORKER_TENSOR_PARALLEL_MASTER", "leader-0.group:29500")
    cfg = _parse(["--tensor-parallel-rank", "1", "--tensor-parallel-timeout-s", "5"])
    assert cfg.parallel == ParallelConfig(2, 1, "leader-0.group:29500", 5.0)
    assert not cfg.parallel.is_leader
