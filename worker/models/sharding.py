"""Megatron-style tensor-parallel sharding of a Llama-family model, done at load time.

Rank ``r`` of ``N`` holds a slice of every decoder layer, cut from the same checkpoint tensors
(no pre-sharded files)::

    q_proj, k_proj, v_proj   column-parallel: the rows of this rank's query heads and of the
                             KV heads they read (and their biases)
    gate_proj, up_proj       column-parallel: a contiguous range of the intermediate rows
    o_proj, down_proj        row-parallel: the matching input columns; the partial outputs of
                             all ranks are summed by an all-reduce (the bias, if any, is added
                             on rank 0 only, so it is counted once)
    norms, embed_tokens,     replicated (``lm_head`` only where logits are computed: the leader)
    lm_head

Heads are cut on KV-group boundaries, so a rank's query heads read only its own KV heads and
grouped-query attention runs unchanged on the rank's slice. With ``N <= num_kv_heads`` the KV
heads are split into contiguous ranges, as evenly as they go (SmolLM2: 3 KV heads, 9 query heads
over 2 ranks -> 2 + 1 KV heads, 6 + 3 query heads). With ``N > num_kv_heads`` each KV head is
REPLICATED on ``N / num_kv_heads`` ranks, which split its query heads::

    8 query heads, 2 KV heads, N = 4:   rank 0: q 0-1, kv 0   rank 1: q 2-3, kv 0
                                        rank 2: q 4-5, kv 1   rank 3: q 6-7, kv 1

The shard's ``ModelConfig`` (``shard_config``: its head counts and intermediate size) is what
the model, the attention backend and the ``CacheEngine`` of that rank are built from: each rank's
KV pool holds only its KV heads, under the same block ids as every other rank's.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from worker.models.config import ModelConfig

# "model.layers.3.mlp.up_proj" -> "mlp.up_proj"
_LAYER_PART = re.compile(r"(?:^|\.)layers\.\d+\.(.+)$")


@dataclass(frozen=True)
class TensorShard:
    """Rank ``rank`` of a tensor-parallel group of ``size``. ``computes_logits``: this rank
    holds ``lm_head`` (the leader, which samples); the others never compute logits."""

    rank: int = 0
    size: int = 1
    computes_logits: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} outside a group of {self.size}")


@dataclass(frozen=True)
class HeadSlice:
    """The query heads ``[q_start, q_stop)`` and KV heads ``[kv_start, kv_stop)`` of one rank."""

    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int


def even_split(total: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``total`` is cut into ``parts`` contiguous
    ranges whose sizes differ by at most one (the larger ones first)."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def head_slice(config: ModelConfig, shard: TensorShard) -> HeadSlice:
    """Which heads ``shard`` holds (module docstring); ValueError when the heads cannot be cut
    on KV-group boundaries for this group size."""
    n, num_kv = shard.size, config.num_kv_heads
    group = config.num_heads // num_kv  # query heads per KV head
    if n <= num_kv:
        kv_start, kv_stop = even_split(num_kv, n, shard.rank)
        return HeadSlice(kv_start * group, kv_stop * group, kv_start, kv_stop)
    replicas = n // num_kv
    if n % num_kv or group % replicas:
        raise ValueError(
            f"tensor_parallel_size {n} cannot split {config.num_heads} query heads over "
            f"{num_kv} KV heads: use a size <= {num_kv}, or a multiple of {num_kv} that divides "
            f"{config.num_heads}")
    kv = shard.rank // replicas
    per_rank = group // replicas
    q_start = kv * group + (shard.rank % replicas) * per_rank
    return HeadSlice(q_start, q_start + per_rank, kv, kv + 1)


def shard_config(config: ModelConfig, shard: TensorShard) -> ModelConfig:
    """The shape of one rank's slice: its head counts and intermediate size."""
    if shard.size == 1:
        return config
    if config.intermediate_size < shard.size:
        raise ValueError(f"intermediate_size {config.intermediate_size} is smaller than "
                         f"tensor_parallel_size {shard.size}")
    heads = head_slice(config, shard)
    start, stop = even_split(config.intermediate_size, shard.size, shard.rank)
    return dataclasses.replace(
        config, num_heads=heads.q_stop - heads.q_start,
        num_kv_heads=heads.kv_stop - heads.kv_start, intermediate_size=stop - start)


def shard_weights(weights: Iterable[tuple[str, torch.Tensor]], config: ModelConfig,
                  shard: TensorShard) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors -> this rank's slices, under the same names (``config`` is the
    full model's). ``lm_head`` is dropped on a rank that computes no logits."""
    if shard.size == 1 and shard.computes_logits:
        yield from weights
        return
    cutter = _Cutter(config, shard)
    for name, tensor in weights:
        if name.removeprefix("model.") == "lm_head.weight" and not shard.computes_logits:
            continue
        yield name, cutter.cut(name, tensor)


class _Cutter:
    """Slices one HF tensor for one rank: rows of column-parallel weights and biases, columns of
    row-parallel weights; everything else whole."""

    def __init__(self, config: ModelConfig, shard: TensorShard) -> None:
        heads, d = head_slice(config, shard), config.head_dim
        inner = even_split(config.intermediate_size, shard.size, shard.rank)
        self.is_first = shard.rank == 0
        self.rows = {
            "self_attn.q_proj": (heads.q_start * d, heads.q_stop * d),
            "self_attn.k_proj": (heads.kv_start * d, heads.kv_stop * d),
            "self_attn.v_proj": (heads.kv_start * d, heads.kv_stop * d),
            "mlp.gate_proj": inner,
            "mlp.up_proj": inner,
        }
        self.columns = {"self_attn.o_proj": (heads.q_start * d, heads.q_stop * d),
                        "mlp.down_proj": inner}

    def cut(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        module, _, kind = name.rpartition(".")
        in_layer = _LAYER_PART.search(module)
        part = in_layer.group(1) if in_layer else ""
        if part in self.rows:
            start, stop = self.rows[part]
            return tensor[start:stop].contiguous()
        if part in self.columns:
            if kind == "bias":  # added once, after the sum: rank 0 keeps it
                return tensor if self.is_first else torch.zeros_like(tensor)
            start, stop = self.columns[part]
            return tensor[:, start:stop].contiguous()
        return tensor
