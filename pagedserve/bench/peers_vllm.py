"""The vLLM side of ``pagedserve bench peers``; runs in vLLM's own virtualenv, never imported.

    .venv-vllm/bin/python pagedserve/bench/peers_vllm.py '{"model": DIR, "dtype": "float32", ...}'

The argument is a JSON object of ``vllm.LLM`` keyword arguments. The engine is loaded (and warmed
up) once; then the script answers jobs, one JSON object per line on stdin, one per line on stdout:

    job:    {"prompts": [[token ids], ...], "max_tokens": [n, ...]}
    answer: {"seconds": s, "outputs": [[token ids], ...], "cached_tokens": [n, ...]}

Every job: ``reset_prefix_cache()`` (each timed run starts with an empty prefix cache), then one
timed ``llm.generate`` of every prompt at once as ``TokensPrompt``s, greedy, ``min_tokens =
max_tokens``, EOS ignored (the engine was warmed up with a tiny request after loading). The
first line written is ``{"ready": true, ...}`` with the load time and the engine's effective
settings; an error is answered with ``{"error": "..."}``. Everything else vLLM prints goes to
stderr: stdout carries only these lines. EOF on stdin ends the process.

Standard library and vLLM only: pagedserve is not installed in that environment.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any  # vllm.LLM: not importable where pagedserve's linters run

# Run as a script, Python puts this file's folder (pagedserve/bench) first on sys.path, where
# modules named like top-level ones (cli, memory, ...) could shadow real packages.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]


def _settings(llm: Any, load_seconds: float) -> dict[str, Any]:
    import torch
    import vllm

    config = llm.llm_engine.vllm_config
    sched, cache, model = config.scheduler_config, config.cache_config, config.model_config
    return {
        "ready": True,
        "load_seconds": load_seconds,
        "vllm_version": vllm.__version__,
        "dtype": str(model.dtype).removeprefix("torch."),
        "max_model_len": model.max_model_len,
        "enforce_eager": model.enforce_eager,
        "block_size": cache.block_size,
        "enable_prefix_caching": cache.enable_prefix_caching,
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "chunked_prefill": sched.enable_chunked_prefill,
        "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""),
        "kv_cache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE", ""),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def _warm_up(llm: Any) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])],
                 SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)


def _run(llm: Any, job: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
              for n in job["max_tokens"]]
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM refused to reset its prefix cache")
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds,
            "outputs": [list(o.outputs[0].token_ids) for o in outs],
            "cached_tokens": [o.num_cached_tokens or 0 for o in outs]}


def main() -> int:
    # Answers go to the real stdout; fd 1 itself becomes stderr, so that anything vLLM or its
    # native code prints (and the engine processes it spawns, which inherit fd 1) stays out of
    # the answer stream.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(obj: dict[str, Any]) -> None:
        answers.write(json.dumps(obj) + "\n")
        answers.flush()

    try:
        from vllm import LLM

        start = time.perf_counter()
        llm = LLM(**json.loads(sys.argv[1]))
        _warm_up(llm)
        answer(_settings(llm, time.perf_counter() - start))
    except Exception as e:
        traceback.print_exc()
        answer({"error": f"vLLM failed to load: {type(e).__name__}: {e}"})
        return 1
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer(_run(llm, json.loads(line)))
        except Exception as e:
            traceback.print_exc()
            answer({"error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":  # vLLM spawns its engine processes: the guard is required
    sys.exit(main())
