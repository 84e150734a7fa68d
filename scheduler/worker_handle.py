"""How the scheduler reaches a worker: one interface, two transports, same engine code.

A step is a ``pagedserve.step.WorkerStep`` in and a ``WorkerResult`` out on both transports.
``InProcessWorkerHandle`` hands those objects to a ``worker.worker.Worker`` (or a test double) in
this process (offline batch use, tests, engine benchmarks): no protobuf on the way.
``GrpcWorkerHandle`` calls a worker pod over gRPC (the cluster) and is the scheduler side's only
user of the step codec (``pagedserve.step_codec``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import grpc

from pagedserve.errors import InvalidArgument, Unavailable
from pagedserve.grpc_util import CHANNEL_OPTIONS
from pagedserve.step import WorkerResult, WorkerStep
from pagedserve.step_codec import decode_result, encode_step
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
        return await asyncio.to_thread(self.worker.step, step)

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

    async def step(self, step: WorkerStep) -> WorkerResult:
        response = await self._call(self._stub.Step, encode_step(step), self.step_timeout)
        try:
            return decode_result(response)
        except InvalidArgument as exc:  # the worker's fault, not the request's
            raise Unavailable(f"worker {self.address} answered a malformed step: {exc}") from exc

    async def reset(self) -> None:
        await self._call(self._stub.Reset, worker_pb2.ResetRequest(), 30.0)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout: float) -> Any:
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"worker {self.address}: {exc.code().name}: {exc.details()}") from exc
