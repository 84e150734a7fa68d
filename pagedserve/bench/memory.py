"""KV memory benchmarks (the paper's §6 measurements), on the real scheduler with a null worker:
block accounting depends on lengths, not on what the model computes.

1. Waste at peak on a mixed workload: allocated-but-unfilled slots over allocated slots, against a
   static allocator that reserves prompt + max_tokens contiguous slots per request.
2. Sharing: blocks held by parallel sampling (n = 2, 4, 6) and beam search (width 2, 4, 6)
   against the same requests run as independent sequences (no sharing), on Alpaca-like lengths.

    python -m pagedserve.bench.memory
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
from dataclasses import dataclass

from pagedserve.bench.null_worker import NullWorker
from pagedserve.core.sampling import make_sampling_params, resolve_sampling_params
from scheduler.config import BatchingConfig, CacheConfig, SchedulerConfig
from scheduler.engine import Engine
from scheduler.worker_handle import InProcessWorkerHandle


@dataclass
class Usage:
    peak_blocks: int = 0
    block_steps: int = 0  # sum over steps of blocks in use (for the time average)
    steps: int = 0
    waste_at_peak: float = 0.0
    reserved_waste_at_peak: float = 0.0

    @property
    def mean_blocks(self) -> float:
        return self.block_steps / max(self.steps, 1)


def alpaca_like(num: int, seed: int) -> list[tuple[int, int]]:
    """(prompt_len, output_len): log-normal around Alpaca's means (19 in, 58 out)."""
    rng = random.Random(seed)
    return [(max(4, int(rng.lognormvariate(math.log(17), 0.5))),
             max(8, int(rng.lognormvariate(math.log(50), 0.55)))) for _ in range(num)]


def mixed(num: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(16, 512), rng.randint(16, 256)) for _ in range(num)]


def _measure(
    engine: Engine, worker: NullWorker, usage: Usage, reserved: dict[str, int]
) -> None:
    kv = engine.workers[0].kv
    used = kv.gpu.num_blocks - kv.gpu.num_free_blocks
    usage.steps += 1
    usage.block_steps += used
    if used <= usage.peak_blocks:
        return
    usage.peak_blocks = used
    filled: dict[int, int] = {}
    live = 0
    for seq, _req in engine.workers[0].core.seqs.values():
        if seq.is_finished:
            continue
        live += seq.num_tokens
        for i, block in enumerate(seq.blocks):
            fill = min(kv.block_size, max(0, seq.num_computed_tokens - i * kv.block_size))
            filled[block.block_id] = max(filled.get(block.block_id, 0), fill)
    slots = used * kv.block_size
    usage.waste_at_peak = 1 - sum(filled.values()) / slots if slots else 0.0
    reserve = sum(reserved[r] for r in engine.requests)
    usage.reserved_waste_at_peak = 1 - live / reserve if reserve else 0.0


def run(lengths: list[tuple[int, int]], *, n: int = 1, beam: int = 1, share: bool = True,
        num_blocks: int = 100_000, block_size: int = 16) -> Usage:
    """Runs every request to completion; ``share=False`` runs each of the n/beam sequences as
    its own request with prefix caching off (what a system without block sharing holds)."""
    async def main() -> Usage:
        worker = NullWorker(num_gpu_blocks=num_blocks, block_size=block_size)
        engine = Engine(SchedulerConfig(batching=BatchingConfig(max_num_seqs=100_000,
                                                                max_num_batched_tokens=1 << 20,
                                                                max_waiting_requests=1 << 20),
                                        cache=CacheConfig(enable_prefix_caching=share)),
                        [InProcessWorkerHandle(worker)])
        usage = Usage()
        reserved: dict[str, int] = {}  # request id -> slots a static allocator reserves
        worker.on_step = lambda _req: _measure(engine, worker, usage, reserved)
        await engine.start()
        rng = random.Random(1)
        streams = []
        for i, (p, o) in enumerate(lengths):
            prompt = [rng.randrange(1, 32000) for _ in range(p)]
            kw: dict[str, int | float]
            copies, kw = (1, {"n": n} if n > 1 else {}) if share else (max(n, beam), {})
            if share and beam > 1:
                kw = {"beam_width": beam, "temperature": 0}
            elif n > 1 or not share:
                kw.setdefault("temperature", 1.0)
            for c in range(copies):
                params = resolve_sampling_params(
                    make_sampling_params(max_tokens=o, ignore_eos=True, seed=i * 7 + c, **kw),
                    num_prompt_tokens=p, max_model_len=8192, max_tokens_limit=8192)
                rid = f"r{i}-{c}"
                reserved[rid] = (p + o) * max(1, params.best_of if share else 1)
                streams.append(engine.submit(rid, prompt, params))
        for stream in streams:
            async for _ in stream:
                pass
        await engine.stop()
        return usage

    return asyncio.run(main())


def memory_table(num_requests: int = 200, seed: int = 0) -> list[tuple[str, str, str, str]]:
    rows = []
    u = run(mixed(num_requests, seed))
    rows.append(("KV waste at peak, mixed workload (lower is better)",
                 f"{u.waste_at_peak:.1%}", f"{u.reserved_waste_at_peak:.1%}",
                 "pagedserve vs static reservation of prompt+max_tokens"))
    lengths = alpaca_like(num_requests, seed)
    for label, n, beam in [("parallel sampling n=2", 2, 1), ("parallel sampling n=4", 4, 1),
                           ("parallel sampling n=6", 6, 1), ("beam search width=2", 1, 2),
                           ("beam search width=4", 1, 4), ("beam search width=6", 1, 6)]:
        shared = run(lengths, n=n, beam=beam)
        alone = run(lengths, n=n, beam=beam, share=False)
        saving = 1 - shared.mean_blocks / alone.mean_blocks
        rows.append((f"blocks, {label} (Alpaca-like)", f"{shared.mean_blocks:.0f}",
                     f"{alone.mean_blocks:.0f}", f"{saving:.1%} fewer blocks with sharing"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedserve bench memory", description=__doc__)
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = memory_table(args.num_requests, args.seed)
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'pagedserve':>10}  {'baseline':>10}  note")
    for name, ours, base, note in rows:
        print(f"{name:<{width}}  {ours:>10}  {base:>10}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
