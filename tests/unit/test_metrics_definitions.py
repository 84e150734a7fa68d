"""Metric classes export the documented names, units and vLLM aliases, with the same values."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pagedserve.core.metrics_server import text_format_app
from router.metrics import VLLM_NAME_MAP as ROUTER_VLLM
from router.metrics import RouterMetrics
from scheduler.metrics import VLLM_NAME_MAP as SCHEDULER_VLLM
from scheduler.metrics import SchedulerMetrics
from tests.support.promql import family_names
from worker.metrics import WorkerMetrics


def _all_registries() -> tuple[CollectorRegistry, CollectorRegistry, CollectorRegistry]:
    router, scheduler, worker = CollectorRegistry(), CollectorRegistry(), CollectorRegistry()
    RouterMetrics(router)
    SchedulerMetrics(scheduler)
    WorkerMetrics(worker)
    return router, scheduler, worker


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_every_family_is_prefixed_and_uses_base_units() -> None:
    for registry in _all_registries():
        for family in registry.collect():
            if family.name.startswith("vllm:"):
                continue
            assert family.name.startswith("pagedserve_"), family.name
            if family.type == "histogram" and "tokens" not in family.name:
                assert family.name.endswith("_seconds"), family.name
            assert not any(u in family.name for u in ("_ms", "_milliseconds", "_mb", "_gb"))


def test_fresh_registries_do_not_clash() -> None:
    _all_registries()
    _all_registries()  # a second instantiation on new registries must not raise


def test_vllm_map_targets_exist_and_aliases_are_exported() -> None:
    router, scheduler, _ = _all_registries()
    for mapping, registry in ((ROUTER_VLLM, router), (SCHEDULER_VLLM, scheduler)):
        names = family_names([registry])
        for vllm_name, ours in mapping.items():
            assert vllm_name.startswith("vllm:")
            assert ours in names, ours
            assert vllm_name in names, vllm_name
    assert not set(ROUTER_VLLM) & set(SCHEDULER_VLLM), "each vllm name comes from one service"


def test_scheduler_aliases_carry_the_same_values() -> None:
    registry = CollectorRegistry()
    m = SchedulerMetrics(registry)
    m.set_queue_sizes(running=4, waiting=2, swapped=1)
    m.set_kv_usage("w0", 0.75)
    m.preempted("recompute", 3)
    m.prefix_cache_lookup(queried_tokens=64, hit_tokens=48)
    m.step_finished(0.02, prompt_tokens=30, generated_tokens=4)
    m.request_finished("stop")
    assert _sample(registry, "vllm:num_requests_running") == 4
    assert _sample(registry, "vllm:num_requests_waiting") == 2
    assert _sample(registry, "vllm:num_requests_swapped") == 1
    assert _sample(registry, "vllm:kv_cache_usage_perc", worker="w0") == 0.75
    assert _sample(registry, "vllm:gpu_cache_usage_perc", worker="w0") == 0.75
    assert _sample(registry, "vllm:num_preemptions_total", mode="recompute") == 3
    assert _sample(registry, "vllm:prefix_cache_queries_total") == 64
    assert _sample(registry, "vllm:prefix_cache_hits_total") == 48
    assert _sample(registry, "vllm:prompt_tokens_total") == 30
    assert _sample(registry, "vllm:generation_tokens_total") == 4
    assert _sample(registry, "vllm:request_success_total", finished_reason="stop") == 1
    assert _sample(registry, "vllm:iteration_tokens_total_sum") == 34


def test_router_request_finished_records_tokens_latency_and_tpot() -> None:
    registry = CollectorRegistry()
    m = RouterMetrics(registry, model_name="smollm2")
    grpc = {"protocol": "grpc"}
    with m.track_stream("grpc"):
        assert _sample(registry, "pagedserve_router_streams_in_flight", **grpc) == 1
        m.observe_ttft(0.25, "grpc")
    assert _sample(registry, "pagedserve_router_streams_in_flight", **grpc) == 0
    m.request_finished("ok", "OK", prompt_tokens=12, generated_tokens=11, e2e_s=1.25, ttft_s=0.25,
                       protocol="grpc")
    assert _sample(registry, "pagedserve_router_requests_total", outcome="ok", code="OK",
                   **grpc) == 1
    assert _sample(registry, "pagedserve_router_prompt_tokens_total", **grpc) == 12
    assert _sample(registry, "pagedserve_router_generated_tokens_total", **grpc) == 11
    assert _sample(registry, "pagedserve_router_time_per_output_token_seconds_sum", **grpc) == 0.1
    assert _sample(registry, "vllm:time_per_output_token_seconds_sum", model_name="smollm2",
                   **grpc) == 0.1
    assert _sample(registry, "vllm:time_to_first_token_seconds_count", model_name="smollm2",
                   **grpc) == 1
    # The HTTP API's series exist from the start, at 0, beside gRPC's.
    assert _sample(registry, "pagedserve_router_generated_tokens_total", protocol="http") == 0
    assert _sample(registry, "pagedserve_router_time_to_first_token_seconds_count",
                   protocol="http") == 0


def test_router_rejects_unknown_outcome_or_protocol_to_bound_cardinality() -> None:
    with pytest.raises(ValueError, match="outcome"):
        RouterMetrics(CollectorRegistry()).request_finished("weird", "OK", 1, 1, 0.1,
                                                            protocol="grpc")
    with pytest.raises(ValueError, match="protocol"):
        RouterMetrics(CollectorRegistry()).request_finished("ok", "OK", 1, 1, 0.1,
                                                            protocol="websocket")
    with pytest.raises(ValueError, match="protocol"):
        RouterMetrics(CollectorRegistry()).track_stream("websocket")


def test_scheduler_kvstore_op_times_and_counts_errors() -> None:
    registry = CollectorRegistry()
    m = SchedulerMetrics(registry)
    with m.kvstore_op("get"):
        pass
    with pytest.raises(ConnectionError), m.kvstore_op("put"):
        raise ConnectionError("redis down")
    assert _sample(registry, "pagedserve_scheduler_kvstore_operation_duration_seconds_count",
                   op="put") == 1
    assert _sample(registry, "pagedserve_scheduler_kvstore_errors_total", op="put") == 1
    assert _sample(registry, "pagedserve_scheduler_kvstore_errors_total", op="get") is None


def test_scheduler_remove_worker_drops_its_series() -> None:
    registry = CollectorRegistry()
    m = SchedulerMetrics(registry)
    m.set_kv_usage("w1", 0.5)
    m.remove_worker("w1")
    m.remove_worker("never-seen")
    assert _sample(registry, "pagedserve_scheduler_kv_cache_usage_ratio", worker="w1") is None
    with pytest.raises(ValueError):
        m.preempted("evict")


def test_worker_memory_and_backend_info() -> None:
    registry = CollectorRegistry()
    m = WorkerMetrics(registry, "w0", "cpu")
    m.set_weight_bytes(270_000_000)
    m.set_backend("torch", "cpu")
    m.step_finished(forward_s=0.01, sampling_s=0.001)
    assert _sample(registry, "pagedserve_worker_model_weight_bytes", rank="0") == 270_000_000
    assert _sample(registry, "pagedserve_worker_attention_backend_info", rank="0",
                   backend="torch", device="cpu", worker_id="w0") == 1
    assert _sample(registry, "pagedserve_worker_forward_duration_seconds_count", rank="0") == 1


def test_worker_cpu_kernels_info_names_the_isa_the_available_ones_and_the_weights() -> None:
    registry = CollectorRegistry()
    m = WorkerMetrics(registry, "w0", "cpu")
    m.set_cpu_kernels("avx2", ("avx512", "avx2", "portable"), "codes")
    assert _sample(registry, "pagedserve_worker_cpu_kernels_info", rank="0",
                   isa="avx2", available="avx512,avx2,portable", weights="codes") == 1
    cuda = CollectorRegistry()
    WorkerMetrics(cuda, "w1", "cuda").set_cpu_kernels("none", ())
    assert _sample(cuda, "pagedserve_worker_cpu_kernels_info", rank="0", isa="none",
                   available="", weights="torch") == 1


def test_worker_on_cpu_reports_process_memory_at_scrape_time() -> None:
    registry = CollectorRegistry()
    WorkerMetrics(registry, "w0", "cpu")
    rss = registry.get_sample_value("pagedserve_worker_device_memory_allocated_bytes",
                                    {"rank": "0"})
    total = _sample(registry, "pagedserve_worker_device_memory_total_bytes", rank="0")
    peak = _sample(registry, "pagedserve_worker_device_memory_peak_bytes", rank="0")
    assert rss is not None and total is not None and peak is not None
    assert 0 < rss <= peak and rss < total


def test_worker_exports_pool_capacity_only() -> None:
    names = family_names([_all_registries()[2]])
    assert "pagedserve_worker_kv_blocks_total" in names
    assert not {"pagedserve_worker_kv_blocks_used", "pagedserve_worker_swap_blocks_used"} & names


def test_scheduler_worker_blocks_by_state_sum_to_the_pool() -> None:
    registry = CollectorRegistry()
    m = SchedulerMetrics(registry)
    m.set_worker_blocks("w0", total=100, free=70, cached_free=20, swap_total=8, swap_free=6)
    blocks = {s: _sample(registry, "pagedserve_scheduler_kv_blocks", worker="w0", state=s)
              for s in ("used", "cached_free", "free")}
    assert blocks == {"used": 30, "cached_free": 20, "free": 50}
    assert _sample(registry, "pagedserve_scheduler_kv_cache_usage_ratio", worker="w0") == 0.3
    assert _sample(registry, "pagedserve_scheduler_swap_blocks", worker="w0", state="used") == 2
    m.remove_worker("w0")
    assert _sample(registry, "pagedserve_scheduler_kv_blocks", worker="w0", state="used") is None


def test_worker_observe_step_counts_tokens_and_sequences() -> None:
    registry = CollectorRegistry()
    m = WorkerMetrics(registry, "w0", "cpu")
    m.set_pools(num_gpu_blocks=128, num_cpu_blocks=64)
    m.observe_step(num_tokens=40, num_sampled=4, forward_s=0.02, num_seqs=4)
    assert _sample(registry, "pagedserve_worker_kv_blocks_total", rank="0") == 128
    assert _sample(registry, "pagedserve_worker_swap_blocks_total", rank="0") == 64
    assert _sample(registry, "pagedserve_worker_computed_tokens_total", rank="0") == 40
    assert _sample(registry, "pagedserve_worker_sampled_tokens_total", rank="0") == 4
    assert _sample(registry, "pagedserve_worker_sequences", rank="0") == 4


def test_worker_series_carry_the_rank_and_the_group_size() -> None:
    registry = CollectorRegistry()
    m = WorkerMetrics(registry, "w0", "cpu", rank=1, tensor_parallel_size=2)
    m.set_weight_bytes(1000)
    assert _sample(registry, "pagedserve_worker_model_weight_bytes", rank="1") == 1000
    assert _sample(registry, "pagedserve_worker_tensor_parallel_size", rank="1") == 2
    for family in registry.collect():
        for sample in family.samples:
            assert sample.labels.get("rank") == "1", sample


def test_metrics_app_keeps_colon_names_even_when_openmetrics_is_asked_for() -> None:
    registry = CollectorRegistry()
    SchedulerMetrics(registry).set_queue_sizes(1, 2, 3)
    app = text_format_app(registry)
    status: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "",
               "HTTP_ACCEPT": "application/openmetrics-text;version=1.0.0"}
    body = b"".join(app(environ, lambda s, h: status.append(s))).decode()
    assert status[0].startswith("200")
    assert "\nvllm:num_requests_waiting 2.0\n" in body
