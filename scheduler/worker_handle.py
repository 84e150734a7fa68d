"""How the scheduler reaches a worker: one interface, two transports, same engine code.

A step is a ``pagedserve.core.step.WorkerStep`` in and a ``WorkerResult`` out on both transports.
``InProcessWorkerHandle`` hands those objects to a ``worker.worker.Worker`` (or a test double) in
this process (offline batch use, tests, engine benchmarks): no protobuf on the way.
``GrpcWorkerHandle`` calls a worker pod over gRPC (the cluster) and is the scheduler side's only
user of the step codec (``pagedserve.core.step_codec``).

Both tell the engine whose fault a failed call was: ``StepRefused`` when a worker that is up
refused a step as malformed (its checks run before it changes anything, so the worker is fine);
``WorkerFault`` when it was reached but failed the step or did not answer in time (device or
other internal error, timeout: a request may be the cause); ``Unavailable`` when it could not be
reached (process gone). The last two take the worker out of service.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import grpc

from pagedserve.core.errors import (
    InvalidArgument,
    NotFound,
    SequenceRefused,
    StepRefused,
    Unavailable,
    WorkerFault,
)
from pagedserve.core.grpc_util import (
    SEQ_ID_METADATA_KEY,
    WORKER_CHANNEL_OPTIONS,
    WORKER_INSTANCE_METADATA,
    ServiceChannel,
    TlsConfig,
)
from pagedserve.core.step import WorkerResult, WorkerStep
from pagedserve.core.step_codec import decode_result, encode_step
from protos.pagedserve.v1 import worker_pb2, worker_pb2_grpc


class WorkerHandle(Protocol):
    name: str

    async def info(self) -> worker_pb2.WorkerInfo: ...

    async def step(self, step: WorkerStep) -> WorkerResult: ...

    async def reset(self) -> None: ...

    async def close(self) -> None: ...


class LocalWorker(Protocol):
    """What an in-process handle drives: ``worker.worker.Worker``, or a double of it."""

    def info(self) -> worker_pb2.WorkerInfo: ...

    def step(self, step: WorkerStep) -> WorkerResult: ...

    def reset(self) -> None: ...


class InProcessWorkerHandle:
    """Runs steps in a thread so the event loop keeps serving while the model computes."""

    def __init__(self, worker: LocalWorker, name: str = "local-0") -> None:
        self.worker = worker
        self.name = name

    async def info(self) -> worker_pb2.WorkerInfo:
        return self.worker.info()

    async def step(self, step: WorkerStep) -> WorkerResult:
        try:
            return await asyncio.to_thread(self.worker.step, step)
        except (InvalidArgument, NotFound) as exc:
            seq_id = exc.seq_id if isinstance(exc, SequenceRefused) else None
            raise StepRefused(f"worker {self.name} refused the step: {exc}", seq_id) from exc

    async def reset(self) -> None:
        self.worker.reset()

    async def close(self) -> None:
        return None


# Every step names (WORKER_INSTANCE_METADATA) the worker process instance its plan was made for
# (``WorkerInfo.instance_id``, learned by ``info()`` at join and rejoin). A worker restarted behind
# the same address, which the scheduler may not have noticed while it was idle, has empty KV
# memory: it refuses the step (FAILED_PRECONDITION) instead of computing on blocks that no longer
# hold what the plan assumes, and the scheduler fails it over and re-admits it as a new worker.
# A dead worker's channel retries connecting at most this far apart (gRPC's default backoff grows
# to 120 s), so a restarted worker is re-admitted within one rejoin probe of serving again.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250),
                     ("grpc.min_reconnect_backoff_ms", 250),
                     ("grpc.max_reconnect_backoff_ms", 1000)]


class GrpcWorkerHandle:
    """Calls a worker at ``address``; ``tls`` is the scheduler's certificate (the worker admits
    only it to the Worker service) and the CA that verifies the worker."""

    def __init__(self, address: str, step_timeout: float = 120.0,
                 tls: TlsConfig | None = None) -> None:
        self.name = address
        self.address = address
        self.step_timeout = step_timeout
        self._channel = ServiceChannel(address, tls, worker_pb2_grpc.WorkerStub,
                                       [*WORKER_CHANNEL_OPTIONS, *RECONNECT_OPTIONS])
        self._instance: tuple[tuple[str, str], ...] = ()  # step metadata, once info() is known

    async def info(self) -> worker_pb2.WorkerInfo:
        info: worker_pb2.WorkerInfo = await self._call(
            "GetInfo", worker_pb2.WorkerInfoRequest(), 30.0)
        self._instance = ((WORKER_INSTANCE_METADATA, info.instance_id),) if info.instance_id else ()
        return info

    async def step(self, step: WorkerStep) -> WorkerResult:
        response = await self._call("Step", encode_step(step), self.step_timeout,
                                    self._instance)
        try:
            return decode_result(response)
        except InvalidArgument as exc:  # the worker's fault, not the request's
            raise Unavailable(f"worker {self.address} answered a malformed step: {exc}") from exc

    async def reset(self) -> None:
        await self._call("Reset", worker_pb2.ResetRequest(), 30.0)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request: Any, timeout: float,
                    metadata: tuple[tuple[str, str], ...] = ()) -> Any:
        try:
            return await getattr(self._channel.stub(), method)(request, timeout=timeout,
                                                                 metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            message = f"worker {self.address}: {exc.code().name}: {exc.details()}"
            if exc.code() in _REFUSALS:
                raise StepRefused(message, _seq_id(exc)) from exc
            if exc.code() in _FAULTS:
                raise WorkerFault(message) from exc
            raise Unavailable(message) from exc


def _seq_id(exc: grpc.aio.AioRpcError) -> int | None:
    for key, value in exc.trailing_metadata() or ():
        if key == SEQ_ID_METADATA_KEY:
            return int(value)
    return None


# What a worker answers when it refuses a request it judged malformed (worker/servicer.py maps
# InvalidArgument and NotFound so); any other status is a fault of the worker or the transport.
_REFUSALS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND})
# A worker that was reached but failed the step (an exception in it), or no answer in time.
_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                     grpc.StatusCode.DEADLINE_EXCEEDED})
