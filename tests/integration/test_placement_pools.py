"""Two real workers over gRPC whose KV pools differ (``num_gpu_blocks`` 8 and 32): a request only
the larger pool can hold runs there and finishes; one no pool can hold is refused at once.

Before placement checked a worker's whole pool, the first request landed on the small worker (both
had room for its prompt; the tie went to the first) and preempted itself until the deadline."""

from __future__ import annotations

import grpc
import pytest

from protos.pagedserve.v1 import common_pb2, generation_pb2
from scheduler.config import SchedulerConfig
from tests.support.cluster import ClusterThread
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_factory import cpu_worker_config

BLOCK_SIZE = 16
SMALL, LARGE = 8, 32  # blocks: 128 and 512 tokens


@pytest.fixture(scope="module")
def cluster():
    model = tiny_llama_dir()
    c = ClusterThread([cpu_worker_config(model, block_size=BLOCK_SIZE, num_gpu_blocks=n)
                       for n in (SMALL, LARGE)], SchedulerConfig())
    yield c
    c.stop()


def _request(ids: list[int], max_tokens: int, **params: object) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=ids),
        params=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                         **params))  # type: ignore[arg-type]


def test_the_scheduler_advertises_the_largest_pool(cluster):
    assert cluster.cluster.engine.model_info.max_num_tokens_per_request == LARGE * BLOCK_SIZE


def test_a_request_only_the_larger_pool_can_hold_finishes_there(cluster):
    prompt = list(range(3, 43))  # 40 tokens: 3 blocks, room on both workers
    msgs = list(cluster.generation.Generate(_request(prompt, 150, temperature=0.0), timeout=60))
    assert msgs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert sum(len(m.token_ids) for m in msgs) == 150  # 190 tokens: more than 8 blocks hold
    engine = cluster.cluster.engine  # only the large worker ever ran a step
    assert [ws.num_steps > 0 for ws in engine.workers] == [False, True]
    assert cluster.all_blocks_free()


def test_a_request_no_pool_can_hold_is_refused_at_once(cluster):
    prompt = list(range(3, 43))
    with pytest.raises(grpc.RpcError) as err:  # 4 samples x 100 tokens: 35 blocks > 32
        list(cluster.generation.Generate(
            _request(prompt, 100, n=4, temperature=1.0, seed=1), timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KV blocks" in err.value.details()
    assert cluster.stats().num_waiting == 0
