"""The Worker gRPC service: a thin typed adapter over the domain ``Worker``.

Domain errors become status codes here and only here (``pagedserve.core.grpc_util.abort_for``);
steps cross here between their wire form and ``pagedserve.core.step`` objects
(``pagedserve.core.step_codec``).
``Step`` runs in a thread (``asyncio.to_thread``) so health checks and GetInfo stay responsive
while the model computes; the ``Worker`` serialises steps itself.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from pagedserve.core.errors import FailedPrecondition, PagedServeError
from pagedserve.core.grpc_util import WORKER_INSTANCE_METADATA, abort_for
from pagedserve.core.step_codec import decode_step, encode_result
from protos.pagedserve.v1 import worker_pb2, worker_pb2_grpc
from worker.worker import Worker

logger = logging.getLogger(__name__)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def GetInfo(
        self, request: worker_pb2.WorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        return self.worker.info()

    async def Step(
        self, request: worker_pb2.StepRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.StepResponse:
        planned_for = dict(context.invocation_metadata() or ()).get(WORKER_INSTANCE_METADATA)
        if planned_for is not None and planned_for != self.worker.instance_id:
            await abort_for(context, FailedPrecondition(
                f"step {request.step_id} was planned for worker instance {planned_for}; this is "
                f"instance {self.worker.instance_id} (restarted: its KV memory is empty)"))
        try:
            step = decode_step(request)
            return encode_result(await asyncio.to_thread(self.worker.step, step))
        except PagedServeError as exc:
            logger.warning("step %d refused: %s", request.step_id, exc)
            await abort_for(context, exc)
        except Exception as exc:
            logger.exception("step %d failed", request.step_id)
            await abort_for(context, exc)
        raise AssertionError("unreachable: abort raises")

    async def Reset(
        self, request: worker_pb2.ResetRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ResetResponse:
        await asyncio.to_thread(self.worker.reset)
        return worker_pb2.ResetResponse()
