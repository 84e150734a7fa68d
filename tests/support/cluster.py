"""A real local cluster (workers, scheduler, router as gRPC servers on 127.0.0.1) running on an
event loop in a background thread, so synchronous tests can drive it with ordinary clients."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any

import grpc

from pagedserve.cluster import LocalCluster, start_local_cluster
from protos.pagedserve.v1 import generation_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc


class ClusterThread:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cluster: LocalCluster = self.run(start_local_cluster(*args, **kwargs))
        self.channel = grpc.insecure_channel(self.cluster.router_address)
        self.generation = generation_pb2_grpc.GenerationStub(self.channel)
        self.sched_channel = grpc.insecure_channel(self.cluster.scheduler_address)
        self.scheduler = scheduler_pb2_grpc.SchedulerStub(self.sched_channel)

    def run(self, coro: Coroutine, timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self) -> scheduler_pb2.SchedulerStats:
        return self.scheduler.GetStats(scheduler_pb2.StatsRequest(), timeout=10)

    def all_blocks_free(self, timeout: float = 5.0) -> bool:
        """Waits (up to ``timeout``) until nothing runs or waits and the first worker's blocks
        are all free: what every test that ends, cancels or fails requests checks."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.stats()
            w = stats.workers[0]
            if (stats.num_running == 0 and stats.num_waiting == 0
                    and w.num_free_blocks == w.num_blocks):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self.channel.close()
        self.sched_channel.close()
        self.run(self.cluster.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
