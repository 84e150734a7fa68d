"""The scheduler checks every token id and length it is given, as the router does, on both
``Submit`` and ``Connect`` (issue 15: an out-of-vocabulary continuation or stop id, or a
continuation longer than the context, reached the worker). A refused request fails alone:
the greedy bystander on the same worker completes with the tokens it gets solo."""

from __future__ import annotations

import grpc
import pytest

from protos.pagedserve.v1 import common_pb2, scheduler_pb2
from scheduler.config import SchedulerConfig
from tests.support.cluster import ClusterThread
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_factory import cpu_worker_config

VOCAB = 512  # tiny_llama's
CONTEXT = 512


@pytest.fixture(scope="module")
def cluster():
    c = ClusterThread([cpu_worker_config(tiny_llama_dir(), num_gpu_blocks=128)],
                      SchedulerConfig(log_interval_seconds=0))
    yield c
    c.stop()


def _params(**fields: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**{"max_tokens": 4, "temperature": 0.0, **fields})


BAD_SUBMITS = [
    pytest.param(dict(prompt_token_ids=[5, VOCAB]), "prompt_token_ids[1]", id="prompt-oov"),
    pytest.param(dict(prompt_token_ids=[5, -1]), "prompt_token_ids[1]", id="prompt-negative"),
    pytest.param(dict(generated_token_ids=[7, 10**6]), "generated_token_ids[1]",
                 id="continuation-oov"),
    pytest.param(dict(params=_params(stop_token_ids=[3, VOCAB + 5])), "stop_token_ids[1]",
                 id="stop-oov"),
    pytest.param(dict(generated_token_ids=[5] * 4), "generated_token_ids",
                 id="continuation-reaches-max-tokens"),
    pytest.param(dict(generated_token_ids=[5] * (CONTEXT + 10),
                      params=_params(max_tokens=20)), "generated_token_ids",
                 id="continuation-beyond-the-context"),
]


def _submit(request_id: str, **fields: object) -> scheduler_pb2.SubmitRequest:
    return scheduler_pb2.SubmitRequest(**{  # type: ignore[arg-type]
        "request_id": request_id, "prompt_token_ids": [5, 6, 7], "params": _params(), **fields})


def _bystander(request_id: str) -> scheduler_pb2.SubmitRequest:
    return _submit(request_id, prompt_token_ids=[9, 8, 7, 6],
                   params=_params(max_tokens=48, ignore_eos=True))


def _tokens(responses) -> list[int]:
    return [t for r in responses for o in r.outputs for t in o.token_ids]


@pytest.fixture(scope="module")
def solo(cluster) -> list[int]:
    return _tokens(cluster.scheduler.Submit(_bystander("solo"), timeout=60))


@pytest.mark.parametrize(("fields", "field"), BAD_SUBMITS)
def test_submit_refuses_bad_ids_and_lengths_alone(cluster, solo, fields, field):
    bystander = cluster.scheduler.Submit(_bystander(f"by-{field}"), timeout=60)
    first = next(bystander)
    with pytest.raises(grpc.RpcError) as err:
        list(cluster.scheduler.Submit(_submit(f"bad-{field}", **fields), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    assert _tokens([first, *bystander]) == solo
    assert all(w.healthy for w in cluster.stats().workers)
    assert cluster.all_blocks_free()


def test_connect_refuses_bad_ids_and_lengths_alone(cluster, solo):
    bad = [_submit(f"bad-{i}", **p.values[0]) for i, p in enumerate(BAD_SUBMITS)]
    message = scheduler_pb2.ConnectRequest(submits=[_bystander("by-connect"), *bad])
    updates = [u for r in cluster.scheduler.Connect(iter([message]), timeout=60)
               for u in r.updates]
    ended = {u.request_id: u for u in updates if u.finished}
    for i, p in enumerate(BAD_SUBMITS):
        update = ended[f"bad-{i}"]
        assert update.status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0], update
        assert p.values[1] in update.status_message
    assert ended["by-connect"].status_code == 0
    assert _tokens([u for u in updates if u.request_id == "by-connect"]) == solo
    assert all(w.healthy for w in cluster.stats().workers)
    assert cluster.all_blocks_free()
