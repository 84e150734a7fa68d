"""A tensor-parallel worker group: N worker processes that the scheduler sees as one worker.

Rank 0, the leader, serves the Worker service; ranks 1..N-1, the followers, only follow it::

    scheduler --Step (gRPC)--> leader --broadcast WorkerStep--> followers
                               every rank: apply the step to its SequenceState mirror and its
                               KV pool (its heads' K/V, same block ids), forward with an
                               all-reduce after each row-parallel projection
                               leader: logits, sampling --broadcast token ids--> followers
                               every rank: append the samples

Why leader-broadcast, not the scheduler stepping every rank: the scheduler keeps one worker per
group (one handle, one instance id, one failure), the step is validated once before any rank
changes anything, and only the leader holds logits and samples. A step reaches the followers in
one ``broadcast_object_list`` from the leader's memory, where the scheduler would have sent it N
times over gRPC and then had to agree which rank's samples count.

Commands (``GroupCommand``) go out in the leader's order, one at a time, under the ``Worker``'s
step lock, and every rank runs the same collectives in the same order: a step (its broadcast, the
all-reduces of its forward, the samples' broadcast), a reset, a heartbeat (the leader sends one
when idle for a third of the timeout, so a follower waiting for a command never times out), or
shutdown. Every collective is bounded by ``timeout_s`` (``init_process_group(timeout=...)``):
when a rank dies or hangs, the others' next collective raises ``GroupFailure`` instead of waiting
forever. The group is then unusable (its ranks disagree on where they are in the sequence of
collectives), so a rank that sees it fail exits non-zero (``worker/server.py``) and the group
restarts as a unit; the scheduler sees the leader fail, as any worker failing, and re-admits the
restarted leader (a new instance id) with an empty KV pool.

Transport: gloo on CPU; on CUDA the all-reduces run over NCCL and the commands over a gloo group
(they are pickled host objects).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pagedserve.core.step import WorkerStep
from worker.config import ParallelConfig
from worker.models.sharding import TensorShard

logger = logging.getLogger(__name__)


class GroupFailure(RuntimeError):
    """A collective of the group failed or timed out: a rank died or hangs. Fatal to the group."""


class CommandKind(enum.Enum):
    STEP = "step"
    RESET = "reset"
    HEARTBEAT = "heartbeat"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True, slots=True)
class GroupCommand:
    """What the leader tells its followers to do next; ``step`` only for ``STEP``."""

    kind: CommandKind
    step: WorkerStep | None = None


HEARTBEAT = GroupCommand(CommandKind.HEARTBEAT)
RESET = GroupCommand(CommandKind.RESET)
SHUTDOWN = GroupCommand(CommandKind.SHUTDOWN)


class TensorParallelGroup:
    """This process's membership of a tensor-parallel group (``torch.distributed``, one process
    group per process).

    Invariant: every rank calls the group's collectives in the same order; the leader decides
    that order by the commands it sends. After a ``GroupFailure`` nothing may be called but
    ``close``."""

    def __init__(self, config: ParallelConfig, device: torch.device) -> None:
        self.rank, self.size = config.rank, config.size
        self.timeout_s = config.timeout_s
        timeout = timedelta(seconds=config.timeout_s)
        backend = "nccl" if device.type == "cuda" else "gloo"
        logger.info("tensor-parallel rank %d of %d: joining %s (%s, timeout %.0fs)",
                    self.rank, self.size, config.master, backend, config.timeout_s)
        assert config.master is not None  # ParallelConfig requires it for size > 1
        host, port = config.master.rsplit(":", 1)
        # The store waits (rendezvous_timeout_s) for ranks that restart later than this one;
        # the collectives wait timeout_s.
        store = dist.TCPStore(host.strip("[]"), int(port), self.size, is_master=self.is_leader,
                              timeout=timedelta(seconds=config.rendezvous_timeout_s))
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.size,
                                timeout=timeout)
        self._control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" \
            else dist.group.WORLD
        self.device = device
        self.failed = threading.Event()
        self._on_failure: list[Callable[[], None]] = []
        logger.info("tensor-parallel group of %d joined (rank %d)", self.size, self.rank)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> TensorShard:
        """The slice of the model this rank holds; only the leader computes logits."""
        return TensorShard(self.rank, self.size, computes_logits=self.is_leader)

    def on_failure(self, listener: Callable[[], None]) -> None:
        """``listener`` is called (from the failing thread) when the group fails."""
        self._on_failure.append(listener)

    def fail(self, reason: BaseException) -> GroupFailure:
        """Marks the group failed (a collective failed, or a rank could not finish a step it
        started with the others) and tells the listeners; returns the error to raise."""
        error = reason if isinstance(reason, GroupFailure) else GroupFailure(
            f"tensor-parallel rank {self.rank} could not finish a step: {reason!r}")
        if not self.failed.is_set():
            self.failed.set()
            logger.error("tensor-parallel group failed: %s", error)
            for listener in self._on_failure:
                listener()
        return error

    # ------------------------------------------------------------------------- collectives

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums ``x`` over the group, in place; returns it (the model's row-parallel sum)."""
        self._collective(dist.all_reduce, x)
        return x

    def min_over_ranks(self, value: int) -> int:
        """The smallest ``value`` of any rank (the group's pool sizes)."""
        t = torch.tensor([value], dtype=torch.int64)
        self._collective(dist.all_reduce, t, op=dist.ReduceOp.MIN, group=self._control)
        return int(t.item())

    def gather_ints(self, value: int) -> list[int]:
        """``value`` of every rank, by rank (weight bytes per rank, for the leader's log)."""
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        self._collective(dist.all_gather, out, torch.tensor([value], dtype=torch.int64),
                         group=self._control)
        return [int(t.item()) for t in out]

    def send(self, command: GroupCommand) -> None:
        """Leader: the next command to every follower."""
        assert self.is_leader
        self._collective(dist.broadcast_object_list, [command], src=0, group=self._control)

    def receive(self) -> GroupCommand:
        """Follower: waits (at most ``timeout_s``) for the leader's next command."""
        assert not self.is_leader
        box: list[GroupCommand | None] = [None]
        self._collective(dist.broadcast_object_list, box, src=0, group=self._control)
        command = box[0]
        assert isinstance(command, GroupCommand)
        return command

    def share_token_ids(self, token_ids: list[int], num_sampled: int) -> list[int]:
        """The leader's sampled token ids, on every rank (a follower passes ``[]``; every rank
        knows ``num_sampled`` from the step)."""
        if num_sampled == 0:
            return token_ids
        t = torch.tensor(token_ids if self.is_leader else [0] * num_sampled, dtype=torch.int64)
        self._collective(dist.broadcast, t, src=0, group=self._control)
        return t.tolist()

    def _collective(self, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        if self.failed.is_set():
            raise GroupFailure("the tensor-parallel group has already failed")
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # gloo raises RuntimeError / DistError subclasses
            raise self.fail(GroupFailure(
                f"tensor-parallel rank {self.rank}: {getattr(fn, '__name__', fn)} failed (a "
                f"rank died or hangs longer than {self.timeout_s:.0f}s): {exc}")) from exc

    def close(self) -> None:
        """Leaves the group. After a failure the process group is left as is: tearing it down
        would wait on the dead peer; the process is about to exit."""
        if not self.failed.is_set() and dist.is_initialized():
            dist.destroy_process_group()


class Heartbeat:
    """Leader: calls ``beat`` (which sends ``HEARTBEAT`` unless a command went out recently)
    every ``interval_s`` until stopped or the group fails, in a daemon thread."""

    def __init__(self, beat: Callable[[], None], interval_s: float) -> None:
        self._beat = beat
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tp-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._beat()
            except GroupFailure:
                logger.exception("tensor-parallel heartbeat failed")
                return

    def stop(self) -> None:
        self._stop.set()


def init_group(config: ParallelConfig, device: torch.device) -> TensorParallelGroup | None:
    """Joins the group this process belongs to; None when the worker is a whole model (size 1)."""
    return TensorParallelGroup(config, device) if config.size > 1 else None
