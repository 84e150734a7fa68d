"""The synchronous engine core driven step by step with no event loop: ``add_request``, then
``step()`` against the content-checking worker double (tests/support/shadow_worker.py) until
nothing is left. Each test names the output behaviour it protects (greedy, stop tokens, parallel
samples, best_of, beam search, abort, a malformed worker result) and checks that every block is
freed and the worker holds nothing at the end. Stop strings are the router's (they need text)."""

from __future__ import annotations

import pytest

from pagedserve.core.errors import Unavailable
from pagedserve.core.step import WorkerResult, WorkerStep
from protos.pagedserve.v1 import common_pb2
from scheduler.engine_core import CoreRequest, EngineCore, FinishedRequest
from scheduler.sequence import SequenceStatus
from tests.support.engine_core import resolved_params, shadow_core
from tests.support.shadow_worker import ShadowWorker, next_token, reference_output


def _run(core: EngineCore, worker: ShadowWorker, max_steps: int = 500
         ) -> dict[str, FinishedRequest]:
    """Steps until the core has nothing left, including telling the worker what to drop."""
    finished: dict[str, FinishedRequest] = {}
    for _ in range(max_steps):
        outputs = core.step(worker)
        if outputs is None:
            break
        for done in outputs.finished:
            finished[done.request.request_id] = done
    assert not core.has_work, "the core stopped making progress"
    return finished


def _assert_all_freed(core: EngineCore, worker: ShadowWorker) -> None:
    gpu = core.kv.gpu
    assert gpu.num_free_blocks == gpu.num_blocks, "blocks leaked"
    assert not core.requests and not core.seqs
    assert worker.seqs == {}, "the worker still holds sequences"


def _outputs(req: CoreRequest) -> list[list[int]]:
    return [s.output_token_ids for s in sorted(req.group.seqs, key=lambda s: s.index)]


def test_greedy_requests_stream_the_reference_tokens_and_end_by_length():
    worker = ShadowWorker(num_gpu_blocks=128)
    core = shadow_core(worker, budget=16)
    prompts = {f"r{i}": [i * 7 + j for j in range(1, 3 + 5 * i)] for i in range(4)}
    reqs = {rid: core.add_request(rid, p, resolved_params(p, max_tokens=6 + i))
            for i, (rid, p) in enumerate(prompts.items())}
    finished = _run(core, worker)
    assert finished.keys() == prompts.keys()
    for i, (rid, prompt) in enumerate(prompts.items()):
        assert _outputs(reqs[rid]) == [reference_output(prompt, 6 + i, None)]
        assert reqs[rid].group.seqs[0].status is SequenceStatus.FINISHED_LENGTH
        assert finished[rid].error is None
    _assert_all_freed(core, worker)


def test_updated_lists_a_request_once_until_its_consumer_takes():
    worker = ShadowWorker()
    core = shadow_core(worker)
    prompt = [5, 6, 7]
    req = core.add_request("r", prompt, resolved_params(prompt, max_tokens=4))
    first = core.step(worker)
    second = core.step(worker)
    assert first is not None and second is not None
    assert first.updated == [req] and second.updated == []  # nobody took the first news
    req.has_news = False  # what RequestStream.take does
    third = core.step(worker)
    assert third is not None and third.updated == [req]
    assert third.stats.worker == "shadow" and third.stats.num_generated_tokens == 1


def test_a_stop_token_ends_the_output_with_it_and_frees_the_blocks():
    worker = ShadowWorker()
    core = shadow_core(worker)
    prompt = [11, 12, 13, 14, 15]
    ref = reference_output(prompt, 12, None)
    stop_id = next(t for i, t in enumerate(ref) if i >= 2 and t not in ref[:i])
    end = ref.index(stop_id) + 1
    req = core.add_request("r", prompt,
                           resolved_params(prompt, max_tokens=12, stop_token_ids=[stop_id]))
    finished = _run(core, worker)
    assert _outputs(req) == [ref[:end]]
    assert req.group.seqs[0].status is SequenceStatus.FINISHED_STOPPED
    assert "r" in finished
    _assert_all_freed(core, worker)


def test_parallel_samples_each_follow_their_own_seed():
    worker = ShadowWorker(num_gpu_blocks=128)
    core = shadow_core(worker)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    req = core.add_request("r", prompt, resolved_params(prompt, max_tokens=7, n=3, seed=21))
    _run(core, worker)
    assert _outputs(req) == [reference_output(prompt, 7, 21 + i) for i in range(3)]
    _assert_all_freed(core, worker)


def test_best_of_streams_nothing_and_hands_over_n_whole_outputs_at_the_end():
    worker = ShadowWorker(num_gpu_blocks=128)
    core = shadow_core(worker)
    prompt = [2, 7, 1, 8, 2, 8]
    req = core.add_request("r", prompt,
                           resolved_params(prompt, max_tokens=5, n=2, best_of=4, seed=3))
    news = []
    while (outputs := core.step(worker)) is not None:
        news.extend(outputs.updated)
    assert news == [req]  # once, at the end, with the outputs
    whole = req.strategy.outputs
    assert len(whole) == 2 and all(o.replaces for o in whole)
    samples = [reference_output(prompt, 5, 3 + i) for i in range(4)]
    assert [list(o.token_ids) for o in whole] == samples[:2]  # equal log-probs: the first two
    assert {o.finish_reason for o in whole} == {common_pb2.FINISH_REASON_LENGTH}
    _assert_all_freed(core, worker)


class BeamShadow(ShadowWorker):
    """Returns, for each sampled sequence, ``logprobs`` top pairs that depend only on its tokens,
    as the real worker's log-softmax would (the shadow's content checks still run)."""

    def step(self, req: WorkerStep) -> WorkerResult:
        result = super().step(req)
        result.top_logprobs = [self._top(self.seqs[seq_id]["tokens"])
                               for seq_id in result.seq_ids]
        return result

    def _top(self, tokens: list[int]) -> list[tuple[int, float]]:
        ids = list(dict.fromkeys(next_token(tokens, salt, self.vocab_size) for salt in range(8)))
        return [(t, -0.3 * (rank + 1) - 0.01 * (t % 7)) for rank, t in enumerate(ids[:4])]


def test_beam_search_forks_and_frees_beams_and_hands_over_the_best_hypotheses():
    worker = BeamShadow(num_gpu_blocks=128)
    core = shadow_core(worker)
    prompt = [9, 8, 7, 6, 5]
    req = core.add_request("r", prompt, resolved_params(prompt, max_tokens=6, beam_width=2, n=2))
    num_forks = 0
    while core.step(worker) is not None:
        num_forks += sum(1 for s in req.group.seqs if s.fork_of is not None)
    whole = req.strategy.outputs
    assert len(whole) == 2 and all(o.replaces for o in whole)
    assert all(0 < len(o.token_ids) <= 6 for o in whole)
    scores = [o.cumulative_logprob / len(o.token_ids) for o in whole]
    assert scores == sorted(scores, reverse=True)
    assert num_forks > 0, "the beams never branched"
    _assert_all_freed(core, worker)


def test_abort_mid_run_frees_every_block_and_the_others_finish_unchanged():
    worker = ShadowWorker(num_gpu_blocks=64)
    core = shadow_core(worker, budget=8)
    keep_prompt, drop_prompt = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15]
    keep = core.add_request("keep", keep_prompt, resolved_params(keep_prompt, max_tokens=10))
    core.add_request("drop", drop_prompt, resolved_params(drop_prompt, max_tokens=10, n=2, seed=1))
    for _ in range(4):
        core.step(worker)
    aborted = core.abort("drop")
    assert aborted is not None
    assert all(s.status is SequenceStatus.FINISHED_ABORTED and not s.blocks
               for s in aborted.group.seqs)
    held = sum(len(s.blocks) for s in keep.group.seqs)
    assert core.kv.gpu.num_blocks - core.kv.gpu.num_free_blocks == held
    assert core.abort("drop") is None
    finished = _run(core, worker)
    assert "drop" not in finished
    assert _outputs(keep) == [reference_output(keep_prompt, 10, None)]
    _assert_all_freed(core, worker)


def test_a_malformed_worker_result_fails_the_step_and_its_requests_continue_elsewhere():
    worker = ShadowWorker(num_gpu_blocks=64, name="a")
    core = shadow_core(worker, name="a")
    prompt = [4, 4, 2, 1, 3]
    req = core.add_request("r", prompt, resolved_params(prompt, max_tokens=8))
    for _ in range(3):
        core.step(worker)
    step = core.schedule()
    assert step is not None
    result = worker.step(step)
    result.token_ids.pop()  # ragged columns: the worker's fault
    with pytest.raises(Unavailable, match="ragged"):
        core.process(result)
    moved = core.evacuate()
    assert moved == [req] and not core.requests and not core.seqs
    seq = req.group.seqs[0]
    assert seq.status is SequenceStatus.WAITING and seq.num_computed_tokens == 0
    other_worker = ShadowWorker(num_gpu_blocks=64, name="b")
    other = shadow_core(other_worker, name="b")
    other.add(req)  # a continuation: prompt plus the tokens generated so far, recomputed
    finished = _run(other, other_worker)
    assert "r" in finished
    assert _outputs(req) == [reference_output(prompt, 8, None)]
    _assert_all_freed(other, other_worker)
