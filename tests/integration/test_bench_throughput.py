"""``pagedserve bench throughput`` end to end on a tiny model: every system runs (the cluster as
``pagedserve up`` processes and in this process), repeats keep each system's fastest, and both
clusters' greedy outputs equal the offline engine's."""

from __future__ import annotations

from pagedserve.bench.throughput import format_report, run_throughput
from pagedserve.bench.workload import WorkloadSpec
from tests.support.tiny_llama import tiny_llama_dir


def test_three_systems_with_repeats() -> None:
    spec = WorkloadSpec(num_requests=6, prompt_len=(4, 12), output_len=(2, 6), seed=3)
    systems = ("offline", "cluster", "cluster-inproc", "hf")
    report = run_throughput(spec, str(tiny_llama_dir()), systems=systems, hf_batch_size=4,
                            kv_cache_memory_gib=0.01, repeat=2)
    assert set(report.results) == set(systems)
    expected_tokens = sum(r.max_tokens for r in _requests(spec))
    for result in report.results.values():
        assert result.num_output_tokens == expected_tokens and result.seconds > 0
    assert report.agreement["cluster"] == report.agreement["cluster-inproc"] == 1.0
    text = format_report(report)
    assert "fastest of 2 runs each" in text and "vs hf" in text


def _requests(spec: WorkloadSpec):  # the same requests the benchmark draws
    from pagedserve.bench.workload import make_requests
    from worker.models.config import ModelConfig

    vocab = ModelConfig.from_hf_dir(tiny_llama_dir()).vocab_size
    return make_requests(spec, vocab)
