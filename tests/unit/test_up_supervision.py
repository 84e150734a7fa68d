"""``pagedserve up`` supervises its children (``Supervisor.supervise``): a child that dies is
started again with the same command after a backoff that doubles while it keeps dying quickly,
the others are left alone, and ``up`` says what it does. Fake processes and a fake clock: no
process, no socket, no waiting."""

from __future__ import annotations

import argparse

import pytest

from pagedserve.up import RESTART_BASE_S, RESTART_MAX_S, STABLE_S, Supervisor, restart_delay


class FakeProc:
    pids = iter(range(1000, 2000))

    def __init__(self, cmd: list[str]) -> None:
        self.args, self.pid, self.returncode = cmd, next(self.pids), None

    def poll(self) -> int | None:
        return self.returncode


class Harness:
    def __init__(self, no_restart: bool = False) -> None:
        self.started: list[FakeProc] = []
        self.serving: set[str] = set()
        self.sup = Supervisor(argparse.Namespace(log_level="INFO", no_restart=no_restart, tls=False,
                                                 api_key_file=None),
                              popen=self._popen)  # type: ignore[arg-type]
        self.sup.is_serving = lambda address: address in self.serving  # type: ignore[method-assign]
        self.worker = self.sup.spawn("worker", ["--port", "5000"], "worker 0", "127.0.0.1:5000",
                                     "loading")[1]
        self.sup.spawn("scheduler", ["--port", "5001"], "scheduler", "127.0.0.1:5001", "joining")

    def _popen(self, cmd: list[str]) -> FakeProc:
        proc = FakeProc(cmd)
        self.started.append(proc)
        return proc


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [restart_delay(n) for n in (1, 2, 3)] == [RESTART_BASE_S, 2 * RESTART_BASE_S,
                                                     4 * RESTART_BASE_S]
    assert restart_delay(50) == RESTART_MAX_S


def test_a_dead_child_is_restarted_with_the_same_command(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    h = Harness()
    svc = h.sup.services[0]
    now = svc.started + 5.0
    h.worker.returncode = -9
    assert h.sup.supervise(now)
    assert len(h.started) == 2 and svc.restart_at == pytest.approx(now + RESTART_BASE_S)
    err = capsys.readouterr().err
    assert f"up: worker 0 (pid {h.worker.pid}) exited with code -9 after 5s; restarting it in " \
           f"{RESTART_BASE_S:.0f}s" in err
    assert h.sup.supervise(now + RESTART_BASE_S / 2)  # backoff not over: nothing started
    assert len(h.started) == 2
    assert h.sup.supervise(now + RESTART_BASE_S)
    restarted = h.started[-1]
    assert restarted.args == h.worker.args and svc.proc is restarted and svc.restarts == 1
    assert f"up: restarted worker 0 (pid {restarted.pid}, restart 1), to serve on " \
           "127.0.0.1:5000" in capsys.readouterr().err
    assert h.sup.services[1].proc is h.started[1] and h.sup.services[1].restarts == 0
    assert h.sup.supervise(now + RESTART_BASE_S + 1)  # loading: not serving yet, nothing said
    assert not svc.serving and capsys.readouterr().err == ""
    h.serving.add("127.0.0.1:5000")
    assert h.sup.supervise(now + RESTART_BASE_S + 2)
    assert svc.serving and "up: worker 0 serving again on 127.0.0.1:5000 after " in \
        capsys.readouterr().err


def test_quick_deaths_back_off_and_a_stable_run_resets_the_backoff() -> None:
    h = Harness()
    svc = h.sup.services[0]
    now = svc.started
    delays = []
    for _ in range(3):  # dies right after each start
        now += 1.0
        svc.proc.returncode = 1  # type: ignore[misc]
        h.sup.supervise(now)
        assert svc.restart_at is not None
        delays.append(svc.restart_at - now)
        now = svc.restart_at
        h.sup.supervise(now)
    assert delays == [restart_delay(1), restart_delay(2), restart_delay(3)]
    now += STABLE_S + 1
    svc.proc.returncode = 1  # type: ignore[misc]
    h.sup.supervise(now)
    assert svc.restart_at == pytest.approx(now + RESTART_BASE_S)


def test_no_restart_stops_the_cluster_on_the_first_death() -> None:
    h = Harness(no_restart=True)
    assert h.sup.supervise(h.sup.services[0].started + 1)
    h.worker.returncode = 1
    assert not h.sup.supervise(h.sup.services[0].started + 2)
    assert len(h.started) == 2  # nothing restarted


def test_ports_for_children_avoid_the_ones_given_on_the_command_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The OS may call the router's ``--port`` free while ``up`` picks a worker's port: ``up``
    never hands out a port given on the command line, nor one it handed out already."""
    import pagedserve.up as up

    offered = iter([50051, 8000, 41000, 41000, 42000])
    monkeypatch.setattr(up, "free_port", lambda: next(offered))
    sup = Supervisor(argparse.Namespace(log_level="INFO", no_restart=False, tls=False,
                                        api_key_file=None, port=50051, http_port=8000,
                                        scheduler_port=0))
    assert [sup.free_port(), sup.free_port()] == [41000, 42000]


def test_up_refuses_per_key_prefix_caches_without_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router would refuse to start (and ``up`` restart it forever): ``up`` says why."""
    from pagedserve.up import run_up

    monkeypatch.delenv("PAGEDSERVE_API_KEYS", raising=False)
    args = argparse.Namespace(log_level="INFO", prefix_cache_isolation="api-key",
                              api_key_file=None)
    assert run_up(args) == 2
