"""Swap versus recompute preemption, measured: the same workload through the offline engine with
a KV pool too small for it, once per mode, plus an unconstrained run as the reference.
The faster mode is the default ``--preemption-mode``.

    python -m pagedserve.bench.preemption [--model PATH] [--num-requests 16]
"""

from __future__ import annotations

import argparse
import random
import time

from pagedserve.llm import LLM
from pagedserve.sampling import make_sampling_params


def run(model: str | None, mode: str, num_blocks: int, prompts: list[list[int]],
        max_tokens: int) -> tuple[float, int, list[list[int]]]:
    with LLM(model, num_gpu_blocks=num_blocks, preemption_mode=mode, swap_space_gib=1.0,
             dtype="float32") as llm:
        params = make_sampling_params(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        started = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - started
        preemptions = sum(llm.engine.workers[0].sched.num_preemptions.values())
    return seconds, preemptions, [o.outputs[0].token_ids for o in outs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedserve bench preemption", description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(100, 30000) for _ in range(args.prompt_len)]
               for _ in range(args.num_requests)]
    per_request = -(-(args.prompt_len + args.max_tokens) // 16)
    tight = per_request * max(2, args.num_requests // 3)  # about a third fits at once
    ref_s, _, reference = run(args.model, "recompute", per_request * args.num_requests * 2,
                              prompts, args.max_tokens)
    print(f"{'mode':<22} {'seconds':>8} {'preemptions':>12} {'vs unconstrained':>17}  identical")
    print(f"{'unconstrained':<22} {ref_s:>8.2f} {0:>12} {1.0:>16.2f}x  -")
    for mode in ("swap", "recompute"):
        seconds, preemptions, outs = run(args.model, mode, tight, prompts, args.max_tokens)
        print(f"{mode + f' ({tight} blocks)':<22} {seconds:>8.2f} {preemptions:>12} "
              f"{ref_s / seconds:>16.2f}x  {outs == reference}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
