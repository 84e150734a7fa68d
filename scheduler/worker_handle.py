"""How the scheduler reaches a worker: one interface, two transports, same engine code.

``InProcessWorkerHandle`` calls a ``worker.worker.Worker`` in this process (offline batch use,
tests, engine benchmarks); ``GrpcWorkerHandle`` calls a worker pod over gRPC (the cluster).

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

from pagedserve.errors import (
    InvalidArgument,
    NotFound,
    SequenceRefused,
    StepRefused,
    Unavailable,
    WorkerFault,
)
from pagedserve.grpc_util import CHANNEL_OPTIONS, SEQ_ID_METADATA_KEY
from protos.pagedserve.v1 import worker_pb2, worker_pb2_grpc


class WorkerHandle(Protocol):
    name: str

    async def info(self) -> worker_pb2.WorkerInfo: ...

    async def step(self, request: worker_pb2.StepRequest) -> worker_pb2.StepResponse: ...

    async def reset(self) -> None: ...

    async def close(self) -> None: ...


class InProcessWorkerHandle:
    """Runs steps in a thread so the event loop keeps serving while the model computes."""

    def __init__(self, worker: Any, name: str = "local-0") -> None:
        self.worker = worker
        self.name = name

    async def info(self) -> worker_pb2.WorkerInfo:
        return self.worker.info()

    async def step(self, request: worker_pb2.StepRequest) -> worker_pb2.StepResponse:
        try:
            return await asyncio.to_thread(self.worker.step, request)
        except (InvalidArgument, NotFound) as exc:
            seq_id = exc.seq_id if isinstance(exc, SequenceRefused) else None
            raise StepRefused(f"worker {self.name} refused the step: {exc}", seq_id) from exc

    async def reset(self) -> None:
        self.worker.reset()

    async def close(self) -> None:
        return None


class GrpcWorkerHandle:
    def __init__(self, address: str, step_timeout: float = 120.0) -> None:
        self.name = address
        self.address = address
        self.step_timeout = step_timeout
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)

    async def info(self) -> worker_pb2.WorkerInfo:
        return await self._call(self._stub.GetInfo, worker_pb2.WorkerInfoRequest(), 30.0)

    async def step(self, request: worker_pb2.StepRequest) -> worker_pb2.StepResponse:
        return await self._call(self._stub.Step, request, self.step_timeout)

    async def reset(self) -> None:
        await self._call(self._stub.Reset, worker_pb2.ResetRequest(), 30.0)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout: float) -> Any:
        try:
            return await method(request, timeout=timeout)
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
