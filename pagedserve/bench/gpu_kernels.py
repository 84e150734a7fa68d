"""Time the Triton paged decode kernel against the memory roofline and torch SDPA (CUDA only).

Shape: batch 64, 32 query heads, 8 KV heads, head dim 128, block size 16, fp16, every sequence
``context`` tokens long, blocks scattered at random through the pool. For each context length:

* roofline = bytes the kernel must move (all K and V of every sequence, plus query, output and
  block tables) / device-to-device copy bandwidth measured in this run (``dst.copy_(src)`` moves
  2x its size; L2 is flushed between repetitions by ``triton.testing.do_bench``);
* SDPA = ``F.scaled_dot_product_attention`` over the same K/V stored contiguously. Decode has no
  mask, so each GQA group's query heads are folded into the query-length axis
  (``[B, kv_heads, group, D]``), which lets SDPA pick its flash kernel and read K/V once per group.

Run from the repo root: ``python -m pagedserve.bench.gpu_kernels``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 64, 32, 8, 128, 16
DTYPE = torch.float16


@dataclass
class Row:
    context: int
    mib: float
    roofline_us: float
    triton_us: float
    sdpa_us: float
    max_abs_diff: float


def copy_bandwidth(do_bench, num_bytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * num_bytes / (ms * 1e-3)


def bench_context(context: int, bandwidth: float, do_bench, partition_size: int) -> Row:
    from worker.attention.torch_backend import gather_context
    from worker.kernels.paged_decode import paged_decode

    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = BATCH * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    value_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    tables = torch.randperm(num_blocks, device="cuda").view(BATCH, blocks_per_seq).int()
    seq_lens = torch.full((BATCH,), context, dtype=torch.int32, device="cuda")
    query = torch.randn(BATCH, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    scale = HEAD_DIM**-0.5

    def run_triton() -> torch.Tensor:
        return paged_decode(
            query, key_cache, value_cache, tables, seq_lens, context, scale,
            partition_size=partition_size,
        )  # fmt: skip

    # Contiguous [B, kv_heads, L, D] copies for SDPA; query heads of a group become query rows.
    keys = gather_context(key_cache, tables, context).transpose(1, 2).contiguous()
    values = gather_context(value_cache, tables, context).transpose(1, 2).contiguous()
    group = NUM_HEADS // NUM_KV_HEADS
    folded = query.view(BATCH, NUM_KV_HEADS, group, HEAD_DIM)

    def run_sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(folded, keys, values, scale=scale)

    diff = (run_triton().float() - run_sdpa().reshape(query.shape).float()).abs().max().item()
    kv_bytes = 2 * BATCH * context * NUM_KV_HEADS * HEAD_DIM * key_cache.element_size()
    other_bytes = 2 * query.numel() * query.element_size() + tables.numel() * 4
    total = kv_bytes + other_bytes
    row = Row(
        context=context,
        mib=total / 2**20,
        roofline_us=total / bandwidth * 1e6,
        triton_us=do_bench(run_triton, warmup=25, rep=100, return_mode="median") * 1e3,
        sdpa_us=do_bench(run_sdpa, warmup=25, rep=100, return_mode="median") * 1e3,
        max_abs_diff=diff,
    )
    return row


def print_table(rows: list[Row], bandwidth: float, partition_size: int) -> None:
    print(
        f"\npaged decode: {torch.cuda.get_device_name()}, batch {BATCH}, heads {NUM_HEADS}/"
        f"{NUM_KV_HEADS} (q/kv), head_dim {HEAD_DIM}, block {BLOCK_SIZE}, {DTYPE}, "
        f"partition {partition_size}; d2d copy bandwidth {bandwidth / 1e9:.0f} GB/s"
    )
    header = (
        f"{'context':>8} {'MiB read':>9} {'roofline us':>12} {'triton us':>10} "
        f"{'% roofline':>10} {'GB/s':>7} {'sdpa us':>9} {'sdpa/triton':>11} {'max|diff|':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.context:>8} {r.mib:>9.1f} {r.roofline_us:>12.1f} {r.triton_us:>10.1f} "
            f"{100 * r.roofline_us / r.triton_us:>9.0f}% "
            f"{r.mib * 2**20 / (r.triton_us * 1e-6) / 1e9:>7.0f} {r.sdpa_us:>9.1f} "
            f"{r.sdpa_us / r.triton_us:>10.2f}x {r.max_abs_diff:>10.2e}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--partition-size", type=int, default=512)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device visible to torch; nothing to time", file=sys.stderr)
        return 2
    if any(c % BLOCK_SIZE for c in args.contexts):
        parser.error(f"contexts must be multiples of the block size {BLOCK_SIZE}")
    from triton.testing import do_bench

    torch.manual_seed(0)
    bandwidth = copy_bandwidth(do_bench)
    rows = []
    for context in args.contexts:
        rows.append(bench_context(context, bandwidth, do_bench, args.partition_size))
        torch.cuda.empty_cache()  # the previous context's caches are garbage now
    print_table(rows, bandwidth, args.partition_size)
    worst = max(r.max_abs_diff for r in rows)
    if worst > 1e-2:
        print(f"gpu_kernels: triton and SDPA outputs differ by {worst:.3e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
