"""``pagedserve bench decode-step --weights`` runs end to end (on a tiny random model, whose fp32
weights have no exact codes, so both formats hold the same panels) and leaves the environment
as it found it."""

from __future__ import annotations

import os

from pagedserve.bench.decode_step import format_weights, run_weights
from tests.support.tiny_llama import tiny_llama_dir
from worker.kernels import cpu_ops


def test_decode_weights_bench_times_both_formats_per_batch() -> None:
    before = os.environ.get(cpu_ops.ENV_CODES)
    results = run_weights(str(tiny_llama_dir()), batches=(1, 3), context=8, iters=2, repeat=1)
    assert [r.batch for r in results] == [1, 3]
    assert all(r.codes_ms > 0 and r.fp32_ms > 0 for r in results)
    assert results[0].codes_weight_bytes == results[0].fp32_weight_bytes  # random: no codes
    assert os.environ.get(cpu_ops.ENV_CODES) == before
    assert "speed-up" in format_weights(results)
