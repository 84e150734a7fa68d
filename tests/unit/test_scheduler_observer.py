"""The engine tells its observer each step as a typed ``StepStats``; the stats line reports what
the worker's own forward pass took of the step time."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pagedserve.core.sampling import make_sampling_params, resolve_sampling_params
from scheduler.config import SchedulerConfig
from scheduler.engine import Engine
from scheduler.events import StepStats
from scheduler.observability import SchedulerObserver
from scheduler.policy import StepPlan
from scheduler.worker_handle import InProcessWorkerHandle
from tests.support.shadow_worker import ShadowWorker


def test_the_stats_line_reports_the_workers_forward_share_of_step_time(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        observer = SchedulerObserver(log_interval_s=0)
        engine = Engine(SchedulerConfig(), [InProcessWorkerHandle(ShadowWorker())],
                        observers=[observer])
        await engine.start()
        observer.start(engine, metrics_port=None)
        observer.log_stats()  # the baseline line
        for seconds, forward in ((2.0, 0.5), (2.0, 1.5)):
            observer.on_step(StepStats("shadow", seconds, forward, 0.1, StepPlan(), 3))
        with caplog.at_level(logging.INFO, logger="scheduler.observability"):
            observer.log_stats()
        await observer.stop()
        await engine.stop()

    asyncio.run(main())
    line = caplog.records[-1].getMessage()
    assert "worker forward 50.0% of step time" in line, line


def test_the_engine_hands_each_step_to_its_observers_with_the_workers_timing() -> None:
    seen: list[StepStats] = []

    class Recorder:
        def on_placement(self, worker: str, reason: str) -> None:
            return None

        def on_step(self, stats: StepStats) -> None:
            seen.append(stats)

        def on_finished(self, group, error) -> None:
            return None

    class TimedShadow(ShadowWorker):
        def step(self, req):
            result = super().step(req)
            result.forward_seconds, result.sample_seconds = 0.25, 0.125
            return result

    async def main() -> None:
        engine = Engine(SchedulerConfig(), [InProcessWorkerHandle(TimedShadow())],
                        observers=[Recorder()])
        await engine.start()
        info = engine.model_info
        params = resolve_sampling_params(
            make_sampling_params(max_tokens=3, temperature=0, ignore_eos=True), num_prompt_tokens=5,
            max_model_len=info.max_model_len, max_tokens_limit=info.max_model_len,
            vocab_size=info.vocab_size, eos_token_ids=info.eos_token_ids)
        stream = engine.submit("r", [5, 6, 7, 8, 9], params)
        async for _ in stream:
            pass
        await engine.stop()

    asyncio.run(main())
    assert seen and all((s.forward_seconds, s.sample_seconds) == (0.25, 0.125) for s in seen)
    assert sum(s.num_generated_tokens for s in seen) == 3
    assert seen[0].num_tokens == 5 and seen[0].worker == "local-0"
