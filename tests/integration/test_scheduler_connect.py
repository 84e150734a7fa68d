"""``Scheduler.Connect``, the multiplexed call routers use, against a real scheduler and worker
(tiny random Llama) on 127.0.0.1: per-step batching across requests, the same tokens as
``Submit``, per-request errors that leave the other requests running, aborts, timeouts and a
cancelled call, each freeing every block."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import pytest

from protos.pagedserve.v1 import common_pb2, scheduler_pb2
from scheduler.config import SchedulerConfig
from tests.support.cluster import ClusterThread
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_factory import cpu_worker_config

NUM_BLOCKS = 128


@pytest.fixture(scope="module")
def cluster():
    c = ClusterThread([cpu_worker_config(tiny_llama_dir(), num_gpu_blocks=NUM_BLOCKS)],
                      SchedulerConfig(log_interval_seconds=0))
    yield c
    c.stop()


class Outbox:
    """A request iterator the test feeds while the call runs; ``close`` half-closes the call."""

    def __init__(self) -> None:
        self._queue: queue.Queue[scheduler_pb2.ConnectRequest | None] = queue.Queue()

    def submit(self, request_id: str, prompt: list[int], max_tokens: int,
               timeout_s: float = 0.0) -> None:
        self._queue.put(scheduler_pb2.ConnectRequest(submits=[scheduler_pb2.SubmitRequest(
            request_id=request_id, prompt_token_ids=prompt, timeout_s=timeout_s,
            params=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                             ignore_eos=True))]))

    def abort(self, request_id: str) -> None:
        self._queue.put(scheduler_pb2.ConnectRequest(abort_request_ids=[request_id]))

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[scheduler_pb2.ConnectRequest]:
        while (message := self._queue.get()) is not None:
            yield message


def _submit_tokens(cluster: ClusterThread, prompt: list[int], max_tokens: int) -> list[int]:
    request = scheduler_pb2.SubmitRequest(
        request_id=f"submit-{prompt[0]}", prompt_token_ids=prompt,
        params=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return [t for r in cluster.scheduler.Submit(request, timeout=60)
            for o in r.outputs for t in o.token_ids]


def test_one_message_per_step_carries_every_request(cluster):
    prompts = {f"r{i}": [7 + i, 11, 13 + 2 * i, 17, 19][: 2 + i % 4] for i in range(8)}
    max_tokens = 12
    outbox = Outbox()
    for request_id, prompt in prompts.items():
        outbox.submit(request_id, prompt, max_tokens)
    outbox.close()  # half-close: the call ends once every request has finished
    tokens: dict[str, list[int]] = {r: [] for r in prompts}
    finished, messages, updates = set(), 0, 0
    steps_before = cluster.stats().num_steps
    for response in cluster.scheduler.Connect(iter(outbox), timeout=60):
        messages += 1
        updates += len(response.updates)
        for update in response.updates:
            assert update.request_id not in finished
            assert update.status_code == 0
            tokens[update.request_id].extend(t for o in update.outputs for t in o.token_ids)
            if update.finished:
                finished.add(update.request_id)
    assert finished == set(prompts)
    # Over Submit, every update would be a message of its own; here there is one per step.
    steps = cluster.stats().num_steps - steps_before
    assert messages <= steps + 1, (messages, steps)
    assert updates >= 3 * messages, (updates, messages)
    for request_id, prompt in prompts.items():
        assert tokens[request_id] == _submit_tokens(cluster, prompt, max_tokens), request_id
    assert cluster.all_blocks_free()


def test_bad_submit_and_abort_leave_the_other_requests_running(cluster):
    outbox = Outbox()
    outbox.submit("long", [5, 6, 7], 400)
    outbox.submit("bad", [5, 10**9], 4)  # not in the vocabulary
    calls = cluster.scheduler.Connect(iter(outbox), timeout=60)
    updates: dict[str, list[scheduler_pb2.RequestUpdate]] = {"long": [], "bad": [], "short": []}
    for response in calls:
        for update in response.updates:
            updates[update.request_id].append(update)
        if updates["bad"] and len(updates["long"]) == 3:
            outbox.abort("long")
            outbox.submit("short", [9, 9, 9], 5)
            outbox.close()
    bad = updates["bad"]
    assert len(bad) == 1 and bad[0].finished
    assert bad[0].status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad[0].status_message.startswith("prompt_token_ids")
    long_tokens = sum(len(o.token_ids) for u in updates["long"] for o in u.outputs)
    assert long_tokens < 400 and not any(u.finished for u in updates["long"])  # aborted
    short = updates["short"]
    assert short[-1].finished and short[-1].status_code == 0
    assert sum(len(o.token_ids) for u in short for o in u.outputs) == 5
    assert calls.code() == grpc.StatusCode.OK
    assert cluster.all_blocks_free()


def test_timeout_ends_the_request_deadline_exceeded(cluster):
    outbox = Outbox()
    outbox.submit("slow", [3, 4, 5], 480, timeout_s=0.05)
    last = None
    for response in cluster.scheduler.Connect(iter(outbox), timeout=60):
        for update in response.updates:
            last = update
        if last is not None and last.finished:
            outbox.close()
    assert last is not None and last.finished
    assert last.status_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert cluster.all_blocks_free()


def test_cancelling_the_call_aborts_every_request(cluster):
    outbox = Outbox()
    for i in range(4):
        outbox.submit(f"c{i}", [20 + i, 21, 22], 480)
    calls = cluster.scheduler.Connect(iter(outbox), timeout=60)
    for _ in calls:
        assert cluster.stats().num_running + cluster.stats().num_waiting == 4
        calls.cancel()
        break
    outbox.close()
    assert cluster.all_blocks_free()


def test_drain_tells_the_router_and_lets_running_requests_finish(cluster):
    """What a scheduler does at the start of its shutdown grace: each call gets ``draining``
    (routers send new requests on a new call); requests already on it run to their end."""
    outbox = Outbox()
    outbox.submit("running", [4, 5, 6], 40)
    drained, tokens, finished = False, 0, False
    for response in cluster.scheduler.Connect(iter(outbox), timeout=60):
        if not drained and response.updates:
            cluster.loop.call_soon_threadsafe(cluster.cluster.scheduler.servicer.drain)
            drained = True
        for update in response.updates:
            tokens += sum(len(o.token_ids) for o in update.outputs)
            finished = finished or update.finished
        if response.draining:
            outbox.close()  # what a router does once the call holds only old requests
    assert drained and finished and tokens == 40
    assert cluster.all_blocks_free()
