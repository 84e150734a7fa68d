"""``CacheEngine``: the worker's KV memory — device block pool, host swap pool, block moves.

Per layer there is one K and one V tensor ``[num_blocks, block_size, num_kv_heads, head_dim]`` on
the device, and a host pool of the same shape with ``num_cpu_blocks`` blocks (pinned on CUDA so
swaps are async DMA). The engine never decides which block holds what: the scheduler names every
block, and the engine only moves them. Every move is one indexed copy per tensor, vectorized over
all the (src, dst) pairs of a step.

Sizing (``num_gpu_blocks_for``): on CUDA, free memory after a profiled max-batch forward; on CPU,
a fixed ``kv_cache_memory_gib`` budget; a ``num_gpu_blocks`` override wins in both cases.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from pagedserve.core.errors import InvalidArgument
from worker.models.config import ModelConfig

logger = logging.getLogger(__name__)

GIB = 1 << 30
BlockPairs = Sequence[tuple[int, int]]


def block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block: K and V, every layer."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem


def num_blocks_for_budget(budget_bytes: float, per_block: int) -> int:
    return max(int(budget_bytes // per_block), 0)


class CacheEngine:
    """Owns ``gpu_cache`` (list of (K, V) per layer, on ``device``) and ``cpu_cache`` (host).

    Invariant: block ids named in moves are in ``[0, num_gpu_blocks)`` / ``[0, num_cpu_blocks)``;
    ``check_pairs`` enforces it before any tensor is touched, so a bad request moves nothing.
    """

    def __init__(
        self,
        config: ModelConfig,
        block_size: int,
        num_gpu_blocks: int,
        num_cpu_blocks: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.device = device
        shape = (block_size, config.num_kv_heads, config.head_dim)
        pin = device.type == "cuda"
        self.gpu_cache = self._allocate(config, (num_gpu_blocks, *shape), dtype, device, False)
        self.cpu_cache = self._allocate(config, (num_cpu_blocks, *shape), dtype, None, pin)
        logger.info(
            "KV cache: %d device blocks, %d host blocks, block_size %d (%.1f KiB per block)",
            num_gpu_blocks, num_cpu_blocks, block_size,
            block_bytes(config, block_size, dtype) / 1024,
        )

    @staticmethod
    def _allocate(
        config: ModelConfig,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | None,
        pin: bool,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        def one() -> torch.Tensor:
            if device is None:
                return torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return torch.zeros(shape, dtype=dtype, device=device)

        return [(one(), one()) for _ in range(config.num_layers)]

    def copy_blocks(self, pairs: BlockPairs) -> None:
        """Device -> device (copy-on-write)."""
        if not pairs:
            return
        self.check_pairs(pairs, "copies", "gpu", "gpu")
        src, dst = self._index(pairs, self.device)
        for k, v in self.gpu_cache:
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))

    def swap_out(self, pairs: BlockPairs) -> None:
        """Device block ``src`` -> host block ``dst``."""
        if not pairs:
            return
        self.check_pairs(pairs, "swap_out", "gpu", "cpu")
        src, _ = self._index(pairs, self.device)
        _, dst = self._index(pairs, torch.device("cpu"))
        for (gk, gv), (ck, cv) in zip(self.gpu_cache, self.cpu_cache, strict=True):
            ck.index_copy_(0, dst, gk.index_select(0, src).to("cpu"))
            cv.index_copy_(0, dst, gv.index_select(0, src).to("cpu"))

    def swap_in(self, pairs: BlockPairs) -> None:
        """Host block ``src`` -> device block ``dst``."""
        if not pairs:
            return
        self.check_pairs(pairs, "swap_in", "cpu", "gpu")
        src, _ = self._index(pairs, torch.device("cpu"))
        _, dst = self._index(pairs, self.device)
        non_blocking = self.device.type == "cuda"
        for (gk, gv), (ck, cv) in zip(self.gpu_cache, self.cpu_cache, strict=True):
            gk.index_copy_(0, dst, self._to_device(ck.index_select(0, src), non_blocking))
            gv.index_copy_(0, dst, self._to_device(cv.index_select(0, src), non_blocking))

    def _to_device(self, t: torch.Tensor, non_blocking: bool) -> torch.Tensor:
        if non_blocking:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=non_blocking)

    @staticmethod
    def _index(pairs: BlockPairs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.tensor(pairs, dtype=torch.int64).view(-1, 2).to(device)
        return both[:, 0], both[:, 1]

    def check_pairs(self, pairs: BlockPairs, what: str, src_pool: str, dst_pool: str) -> None:
        """Raises ``InvalidArgument`` unless every id is inside its pool ("gpu" or "cpu") and no
        destination is named twice (the result would depend on copy order)."""
        sizes = {"gpu": self.num_gpu_blocks, "cpu": self.num_cpu_blocks}
        num_src, num_dst = sizes[src_pool], sizes[dst_pool]
        for src, dst in pairs:
            if not (0 <= src < num_src and 0 <= dst < num_dst):
                raise InvalidArgument(
                    what, f"block pair ({src}, {dst}) out of range "
                    f"({src_pool} src < {num_src}, {dst_pool} dst < {num_dst})",
                )
        dsts = [dst for _, dst in pairs]
        if len(set(dsts)) != len(dsts):
            raise InvalidArgument(what, "a destination block is named twice")
