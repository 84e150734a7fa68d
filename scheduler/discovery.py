"""Worker discovery on Kubernetes through a headless Service: its DNS name resolves to one
address per ready worker pod. The scheduler resolves it at start (waiting for at least one
worker) and then periodically, admitting new workers; a worker that goes away is handled by the
engine's failure path (its requests continue elsewhere) when its steps fail.

``--worker-discovery k8s-headless=NAME:PORT`` (e.g. ``ps-pagedserve-worker.llm.svc:50053``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


def parse_discovery(spec: str) -> tuple[str, int]:
    kind, _, target = spec.partition("=")
    host, _, port = target.rpartition(":")
    if kind != "k8s-headless" or not host or not port.isdigit():
        raise ValueError(f"--worker-discovery {spec!r}: use k8s-headless=NAME:PORT")
    return host, int(port)


async def resolve(host: str, port: int) -> list[str]:
    """``HOST:PORT`` for every address the name resolves to, sorted (stable worker order)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, family=socket.AF_INET)
    except socket.gaierror:
        return []
    return sorted({f"{info[4][0]}:{port}" for info in infos})


async def wait_for_workers(
    host: str, port: int, timeout: float, interval: float = 2.0
) -> list[str]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await resolve(host, port)
        if found:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"no worker behind {host}:{port} after {timeout:.0f}s")
        logger.info("waiting for workers behind %s:%d", host, port)
        await asyncio.sleep(interval)


async def watch(host: str, port: int, known: set[str],
                admit: Callable[[str], Awaitable[None]], interval: float = 10.0) -> None:
    """Runs forever: admits every newly resolved address."""
    while True:
        await asyncio.sleep(interval)
        for address in await resolve(host, port):
            if address not in known:
                try:
                    await admit(address)
                    known.add(address)
                except Exception as exc:  # a pod not ready yet is retried next round
                    logger.warning("worker %s not admitted yet: %s", address, exc)
