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
        self.sup = Supervisor(argparse.Namespace(log_level="INFO", log_format="text",
                                                 no_restart=no_restart, tls=False,
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
    sup = Supervisor(argparse.Namespace(log_level="INFO", log_format="text", no_restart=False,
                                        tls=False, api_key_file=None, port=50051, http_port=8000,
                                        scheduler_port=0))
    assert [sup.free_port(), sup.free_port()] == [41000, 42000]


def test_up_refuses_per_key_prefix_caches_without_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router would refuse to start (and ``up`` restart it forever): ``up`` says why."""
    from pagedserve.up import run_up

    monkeypatch.delenv("PAGEDSERVE_API_KEYS", raising=False)
    args = argparse.Namespace(log_level="INFO", log_format="text", prefix_cache_isolation="api-key",
                              api_key_file=None)
    assert run_up(args) == 2


# ---------------------------------------- tensor-parallel groups (--tensor-parallel-size)

class FakeRank(FakeProc):
    """A rank process that records signals; ``terminate`` leaves it running (a rank stuck in a
    collective may not stop at once), ``kill`` ends it."""

    def __init__(self, cmd: list[str]) -> None:
        super().__init__(cmd)
        self.signals: list[str] = []

    def terminate(self) -> None:
        self.signals.append("TERM")

    def kill(self) -> None:
        self.signals.append("KILL")
        self.returncode = -9

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


def _up_args(*argv: str) -> argparse.Namespace:
    from pagedserve.up import add_up_arguments

    parser = argparse.ArgumentParser()
    add_up_arguments(parser)
    return parser.parse_args(["--model", "/models/tiny", "--http-port", "0", *argv])


class GroupHarness:
    """``up --workers 2 --tensor-parallel-size 2`` started with fake processes: nothing waits
    (every child "serves" at once) and ports come from a counter."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *argv: str) -> None:
        import pagedserve.up as up

        ports = iter(range(41000, 42000))
        monkeypatch.setattr(up, "free_port", lambda: next(ports))
        self.started: list[FakeRank] = []
        self.serving: set[str] = set()
        self.sup = Supervisor(_up_args("--workers", "2", "--tensor-parallel-size", "2", *argv),
                              popen=self._popen)  # type: ignore[arg-type]
        self.sup._wait = lambda child, proc: None  # type: ignore[method-assign]
        self.sup.is_serving = lambda address: address in self.serving  # type: ignore[method-assign]
        self.sup.start()

    def _popen(self, cmd: list[str]) -> FakeRank:
        proc = FakeRank(cmd)
        self.started.append(proc)
        return proc

    def service(self, name: str):  # type: ignore[no-untyped-def]
        return next(svc for svc in self.sup.services if svc.name == name)


def _flag(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == flag]


def _worker_config(cmd: list[str]):  # type: ignore[no-untyped-def]
    """A rank's command through the worker's real parser (``python -m worker``'s)."""
    from pagedserve.core.logs import add_logging_arguments
    from worker.config import add_worker_arguments, worker_config_from_args

    assert cmd[1:3] == ["-m", "worker"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_worker_arguments(parser)
    add_logging_arguments(parser)
    return worker_config_from_args(parser.parse_args(cmd[3:]))


def test_each_worker_is_a_group_of_ranks_and_only_leaders_go_to_the_scheduler(
        monkeypatch: pytest.MonkeyPatch) -> None:
    h = GroupHarness(monkeypatch)
    assert [svc.name for svc in h.sup.services] == ["worker 0", "worker 1", "scheduler",
                                                    "router"]
    masters = set()
    for i in range(2):
        group = h.service(f"worker {i}")
        assert [m.name for m in group.members] == [f"worker-{i}-rank0", f"worker-{i}-rank1"]
        configs = [_worker_config(m.cmd) for m in group.members]
        assert [c.parallel.rank for c in configs] == [0, 1]
        assert {(c.parallel.size, c.parallel.master, c.server.worker_id) for c in configs} == {
            (2, configs[0].parallel.master, f"worker-{i}")}  # one rendezvous per group
        masters.add(configs[0].parallel.master)
        assert [f"127.0.0.1:{c.server.port}" for c in configs] == [m.address for m in
                                                                  group.members]
    assert len(masters) == 2
    scheduler = h.service("scheduler").members[0].cmd
    assert _flag(scheduler, "--worker") == [h.service("worker 0").address,
                                            h.service("worker 1").address]
    ports = [c.server.port for svc in h.sup.services[:2] for c in map(
        _worker_config, (m.cmd for m in svc.members))]
    assert len(set(ports)) == 4 and not set(ports) & {int(m.rsplit(":")[1]) for m in masters}


def test_tensor_parallel_size_one_starts_plain_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    h = GroupHarness(monkeypatch, "--tensor-parallel-size", "1")
    worker = h.service("worker 0")
    assert [m.name for m in worker.members] == ["worker 0"]
    assert "--tensor-parallel-size" not in worker.members[0].cmd
    assert _worker_config(worker.members[0].cmd).parallel.size == 1


def test_a_group_whose_ranks_all_exited_before_the_look_names_the_killed_one_first(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A killed follower's leader exits 1 at once (its group failed): both are gone by the next
    round, and the line leads with the rank a signal killed, the cause."""
    h = GroupHarness(monkeypatch)
    group = h.service("worker 0")
    leader, follower = (m.proc for m in group.members)
    capsys.readouterr()
    leader.returncode, follower.returncode = 1, -9  # type: ignore[misc]
    assert h.sup.supervise(group.started + 5.0)
    assert f"up: worker-0-rank1 (pid {follower.pid}) exited with code -9, worker-0-rank0 (pid " \
           f"{leader.pid}) exited with code 1 after 5s; stopping the rest of worker 0 (none " \
           f"left) and restarting its 2 ranks in" in capsys.readouterr().err
    assert not leader.signals  # type: ignore[attr-defined]


def test_a_dead_follower_restarts_its_whole_group(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    h = GroupHarness(monkeypatch)
    group, other = h.service("worker 0"), h.service("worker 1")
    leader, follower = (m.proc for m in group.members)
    cmds = [m.cmd for m in group.members]
    capsys.readouterr()
    now = group.started + 5.0
    follower.returncode = -9  # type: ignore[misc]
    assert h.sup.supervise(now)
    assert leader.signals == ["TERM"]  # type: ignore[attr-defined]
    assert group.restart_at == pytest.approx(now + RESTART_BASE_S)
    assert f"up: worker-0-rank1 (pid {follower.pid}) exited with code -9 after 5s; stopping " \
           f"the rest of worker 0 (worker-0-rank0 pid {leader.pid}) and restarting its 2 " \
           f"ranks in {RESTART_BASE_S:.0f}s" in capsys.readouterr().err
    n_started = len(h.started)
    assert h.sup.supervise(now + RESTART_BASE_S / 2)  # backoff not over: nothing started
    assert len(h.started) == n_started
    assert h.sup.supervise(now + RESTART_BASE_S)
    assert leader.signals == ["TERM", "KILL"]  # type: ignore[attr-defined]  # still running
    assert [m.cmd for m in group.members] == cmds and group.restarts == 1
    assert [m.proc for m in group.members] == h.started[n_started:]  # leader first, then rank 1
    err = capsys.readouterr().err
    assert f"up: restarted worker 0 (worker-0-rank0 pid {group.members[0].proc.pid}, " \
           f"worker-0-rank1 pid {group.members[1].proc.pid}; restart 1), leader to serve on " \
           f"{group.address}" in err
    assert all(m.proc.poll() is None and not m.proc.signals  # type: ignore[attr-defined]
               for m in other.members) and other.restarts == 0
    h.serving.add(group.members[0].address)  # the leader alone is not the group
    assert h.sup.supervise(now + RESTART_BASE_S + 1)
    assert not group.serving and capsys.readouterr().err == ""
    h.serving.add(group.members[1].address)
    assert h.sup.supervise(now + RESTART_BASE_S + 2)
    assert group.serving
    assert f"up: worker 0 serving again on {group.address} (all 2 ranks) after " in \
        capsys.readouterr().err


def test_a_dead_leader_restarts_its_group_with_the_backoff(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    h = GroupHarness(monkeypatch)
    group = h.service("worker 1")
    now = group.started
    delays = []
    for _ in range(2):  # the leader dies right after each start
        now += 1.0
        group.members[0].proc.returncode = 1  # type: ignore[misc]
        h.sup.supervise(now)
        assert group.members[1].proc.signals == ["TERM"]  # type: ignore[attr-defined]
        assert group.restart_at is not None
        delays.append(group.restart_at - now)
        now = group.restart_at
        h.sup.supervise(now)
    assert delays == [restart_delay(1), restart_delay(2)] and group.restarts == 2


def test_no_restart_stops_the_cluster_when_a_follower_dies(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    h = GroupHarness(monkeypatch, "--no-restart")
    n_started = len(h.started)
    assert h.sup.supervise(h.sup.services[0].started + 1)
    h.service("worker 1").members[1].proc.returncode = 1  # type: ignore[misc]
    assert not h.sup.supervise(h.sup.services[0].started + 2)
    assert len(h.started) == n_started


def test_ranks_share_the_cores_unless_the_user_chose_threads(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    from pagedserve.up import share_cores_between_ranks

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    env: dict[str, str] = {}
    share_cores_between_ranks(4, env)
    assert env == {"OMP_NUM_THREADS": "2"}
    share_cores_between_ranks(16, env := {})
    assert env == {"OMP_NUM_THREADS": "1"}
    share_cores_between_ranks(4, env := {"OMP_NUM_THREADS": "3"})
    assert env == {"OMP_NUM_THREADS": "3"}
