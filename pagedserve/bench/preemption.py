"""Swap versus recompute preemption, measured: the same workload through the offline engine with
a KV pool too small for it, once per mode, plus an unconstrained run as the reference.
The faster mode is the default ``--preemption-mode``.

    python -m pagedserve.bench.preemption [--model PATH] [--num-requests 16]
"""

from __future__ import annotations

import argparse
import random
import time

from pagedserve.core.sampling import make_sampling_params
from pagedserve.llm import LLM


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


def run_preemption(model: str | None = None, num_requests: int = 16, prompt_len: int = 96,
                   max_tokens: int = 64, seed: int = 0) -> list[tuple[str, float, int, bool]]:
    """``[(mode, seconds, preemptions, identical_to_unconstrained)]``, unconstrained first."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 30000) for _ in range(prompt_len)] for _ in range(num_requests)]
    per_request = -(-(prompt_len + max_tokens) // 16)
    tight = per_request * max(2, num_requests // 3)  # about a third fits at once
    ref_s, _, reference = run(model, "recompute", per_request * num_requests * 2, prompts,
                              max_tokens)
    rows = [("unconstrained", ref_s, 0, True)]
    for mode in ("swap", "recompute"):
        seconds, preemptions, outs = run(model, mode, tight, prompts, max_tokens)
        rows.append((mode, seconds, preemptions, outs == reference))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedserve bench preemption", description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = run_preemption(args.model, args.num_requests, args.prompt_len, args.max_tokens,
                          args.seed)
    ref_s = rows[0][1]
    print(f"{'mode':<14} {'seconds':>8} {'preemptions':>12} {'speed vs unconstrained':>23}  "
          "identical output")
    for mode, seconds, preemptions, same in rows:
        print(f"{mode:<14} {seconds:>8.2f} {preemptions:>12} {ref_s / seconds:>22.2f}x  {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
