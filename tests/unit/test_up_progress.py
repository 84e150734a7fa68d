"""``pagedserve up`` says what it waits for while a child starts (``wait_until_serving``), on a
fake clock: no process, no socket, no real waiting."""

from __future__ import annotations

import io

import pytest

from pagedserve.up import POLL_S, Child, wait_until_serving


class FakeClock:
    """``sleep`` advances ``now``; nothing else does."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeProcess:
    def __init__(self, exit_at: float | None = None, clock: FakeClock | None = None) -> None:
        self.exit_at, self.clock, self.returncode = exit_at, clock, None

    def poll(self) -> int | None:
        if self.exit_at is not None and self.clock is not None and self.clock() >= self.exit_at:
            self.returncode = 3
        return self.returncode


WORKER = Child("worker 0", "127.0.0.1:5000", "loading the model / building CPU kernels",
               started=100.0)


def _wait(clock: FakeClock, serving_at: float, proc: FakeProcess | None = None,
          timeout: float = 300.0) -> tuple[float, list[str]]:
    out = io.StringIO()
    elapsed = wait_until_serving(WORKER, proc or FakeProcess(), timeout,
                                 lambda: clock() >= serving_at, clock=clock, sleep=clock.sleep,
                                 every_s=5.0, out=out)
    return elapsed, out.getvalue().splitlines()


def test_a_slow_start_is_announced_then_reported_every_five_seconds_then_ready() -> None:
    clock = FakeClock()
    elapsed, lines = _wait(clock, serving_at=100.0 + 12.1)
    waiting = ("up: waiting for worker 0 on 127.0.0.1:5000 "
               "(loading the model / building CPU kernels) ...")
    assert lines == [waiting, f"{waiting} 5s", f"{waiting} 10s",
                     "up: worker 0 ready on 127.0.0.1:5000 after 12.2s"]
    assert elapsed == pytest.approx(12.2)


def test_a_child_already_serving_is_only_reported_ready() -> None:
    clock = FakeClock(now=103.0)  # e.g. worker 1, loaded while up waited for worker 0
    elapsed, lines = _wait(clock, serving_at=0.0)
    assert lines == ["up: worker 0 ready on 127.0.0.1:5000 after 3.0s"]
    assert elapsed == pytest.approx(3.0)


def test_a_child_that_exits_is_named_in_the_error() -> None:
    clock = FakeClock()
    with pytest.raises(RuntimeError, match="worker 0 exited with code 3 before serving"):
        _wait(clock, serving_at=1e9, proc=FakeProcess(exit_at=101.0, clock=clock))


def test_the_timeout_counts_from_the_childs_start() -> None:
    clock = FakeClock(now=150.0)  # 50 s after the child started
    with pytest.raises(TimeoutError, match=r"worker 0 not serving on 127.0.0.1:5000 after 60s"):
        _wait(clock, serving_at=1e9, timeout=60.0)
    assert clock() == pytest.approx(160.0, abs=POLL_S)  # gave up at the first poll past 60 s
