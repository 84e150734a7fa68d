"""``pagedserve bench peers``, the parts that run without vLLM, on a tiny model: the pagedserve
side of a comparison and the check against Hugging Face ``generate``."""

from __future__ import annotations

from pagedserve.bench.peers import (
    Comparison,
    Run,
    Workload,
    check_lengths,
    format_comparison,
    hf_check,
    run_pagedserve,
)
from tests.support.tiny_llama import tiny_llama_dir


def test_pagedserve_side_and_hf_check_on_a_tiny_model() -> None:
    """``run_pagedserve`` produces exactly the asked lengths, and ``hf_check`` finds them equal to
    HF greedy; a request where the other system differs is checked too and counted against it."""
    model = str(tiny_llama_dir())
    workload = Workload("w", "test", [[5, 6, 7, 8], [9, 10] * 5, [11, 12, 13]], [4, 6, 3])
    ours = run_pagedserve(model, workload, kv_cache_gib=0.01)
    check_lengths("pagedserve", workload, ours)
    theirs = Run(1.0, [list(o) for o in ours.outputs], 0)
    theirs.outputs[2][1] = (theirs.outputs[2][1] + 1) % 512
    c = Comparison(workload)
    c.runs["pagedserve"], c.runs["vllm"] = [ours], [theirs]
    hf_check(model, [c], count=1)
    assert c.hf_indices == [0, 2]
    assert c.hf == {"pagedserve": (2, 2), "vllm": (1, 2)}
    assert "(requests 0, 2): pagedserve 2/2, vllm 1/2" in format_comparison(c)
