"""How the scheduler reaches a worker: one interface, two transports, same engine code.

``InProcessWorkerHandle`` calls a ``worker.worker.Worker`` in this process (offline batch use,
tests, engine benchmarks); ``GrpcWorkerHandle`` calls a worker pod over gRPC (the cluster).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import grpc

from pagedserve.errors import Unavailable
from pagedserve.grpc_util import TlsConfig, aio_channel
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
        return await asyncio.to_thread(self.worker.step, request)

    async def reset(self) -> None:
        self.worker.reset()

    async def close(self) -> None:
        return None


class GrpcWorkerHandle:
    """Calls a worker at ``address``; ``tls`` is the scheduler's certificate (the worker admits
    only it to the Worker service) and the CA that verifies the worker."""

    def __init__(self, address: str, step_timeout: float = 120.0,
                 tls: TlsConfig | None = None) -> None:
        self.name = address
        self.address = address
        self.step_timeout = step_timeout
        self._channel = aio_channel(address, tls)
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
            raise Unavailable(f"worker {self.address}: {exc.code().name}: {exc.details()}") from exc
