"""``pagedserve bench prefix``: requests sharing a long prefix, prefix caching on vs off.

``num_requests`` prompts = one shared ``prefix_len``-token prefix + a distinct ``suffix_len``-token
suffix, all submitted at once to the offline engine, greedy, EOS ignored. With caching the
prefix's full blocks are computed by the first requests admitted and found by hash by the rest.
Both runs use a fresh engine and worker on the same model; the ratio is off / on wall time.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from pagedserve.core.sampling import make_sampling_params
from protos.pagedserve.v1 import common_pb2

TARGET_SPEEDUP = 3.5


@dataclass
class PrefixResult:
    num_requests: int
    prefix_len: int
    seconds_on: float
    seconds_off: float
    cached_tokens_on: int
    same_outputs: bool

    @property
    def speedup(self) -> float:
        return self.seconds_off / self.seconds_on


def run_prefix(model: str | None = None, num_requests: int = 32, prefix_len: int = 512,
               suffix_len: int = 16, output_len: int = 16, seed: int = 0) -> PrefixResult:
    rng = random.Random(seed)
    prefix = [rng.randrange(100, 30000) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(100, 30000) for _ in range(suffix_len)]
               for _ in range(num_requests)]
    params = make_sampling_params(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    seconds_off, outs_off, _ = _timed(model, prompts, params, caching=False)
    seconds_on, outs_on, cached = _timed(model, prompts, params, caching=True)
    return PrefixResult(num_requests, prefix_len, seconds_on, seconds_off, cached,
                        outs_on == outs_off)


def _timed(model: str | None, prompts: list[list[int]], params: common_pb2.SamplingParams,
           caching: bool) -> tuple[float, list[list[int]], int]:
    from pagedserve import LLM

    with LLM(model, seed=0, enable_prefix_caching=caching, kv_cache_memory_gib=1.0,
             swap_space_gib=0.0) as llm:
        llm.generate([[1, 2, 3]], make_sampling_params(max_tokens=2, temperature=0.0))
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
    return (seconds, [o.outputs[0].token_ids for o in outs],
            sum(o.num_cached_tokens for o in outs))


def format_result(r: PrefixResult) -> str:
    verdict = "meets" if r.speedup >= TARGET_SPEEDUP else "misses"
    return "\n".join([
        f"{r.num_requests} requests sharing a {r.prefix_len}-token prefix (offline engine)",
        f"  caching off: {r.seconds_off:.2f} s",
        (f"  caching on:  {r.seconds_on:.2f} s  ({r.cached_tokens_on} prompt tokens served from "
        f"cache)"),
        (f"  speedup {r.speedup:.2f}x ({verdict} the {TARGET_SPEEDUP}x target); "
        f"outputs identical: {r.same_outputs}"),
    ])
