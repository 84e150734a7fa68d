"""Async orchestration: send requests on their arrival schedule, under an optional concurrency
cap, each with its own deadline, the whole phase under one overall deadline.

Bounds, so that every run ends by itself:
- a fixed number of requests;
- each request is cut at ``request_timeout_s`` (``DEADLINE_EXCEEDED``; the server is told the
  deadline too, so it can free the request's blocks);
- the phase is cut at its overall deadline: requests in flight become ``CANCELLED`` and the ones
  not yet sent are counted as ``num_not_sent``.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pagedserve.loadtest.arrivals import arrival_offsets
from pagedserve.loadtest.backends import Backend
from pagedserve.loadtest.datasets import RequestSpec
from pagedserve.loadtest.metrics import RequestResult


@dataclass(frozen=True)
class RunConfig:
    rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    request_timeout_s: float = 60.0
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"--request-timeout must be > 0, got {self.request_timeout_s}")


@dataclass
class PhaseOutcome:
    """The results of one phase (warmup or measured), in request order."""

    results: list[RequestResult] = field(default_factory=list)
    num_planned: int = 0
    duration_s: float = 0.0
    timed_out: bool = False

    @property
    def num_not_sent(self) -> int:
        return self.num_planned - len(self.results)


class _Progress:
    """tqdm when installed; otherwise one self-overwriting stderr line, at most twice a second."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar: Any = None
        self._total, self._desc, self._enabled = total, desc, enabled
        self._done, self._failed, self._last_print = 0, 0, 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False)
            except ImportError:
                pass

    def update(self, ok: bool) -> None:
        self._done += 1
        self._failed += 0 if ok else 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(failed=self._failed, refresh=False)
        elif self._enabled and (
            time.monotonic() - self._last_print > 0.5 or self._done == self._total
        ):
            self._last_print = time.monotonic()
            print(
                f"\r{self._desc}: {self._done}/{self._total} done, {self._failed} failed",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled:
            print(file=sys.stderr)


class Phase:
    """Sends one list of requests and collects their results. Used once."""

    def __init__(self, backend: Backend, cfg: RunConfig, desc: str) -> None:
        self._backend = backend
        self._cfg = cfg
        self._desc = desc
        self._sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        self._results: list[RequestResult] = []
        self._origin = 0.0

    async def run(
        self, specs: list[RequestSpec], offsets: list[float], timeout_s: float
    ) -> PhaseOutcome:
        progress = _Progress(len(specs), self._desc, self._cfg.show_progress)
        self._origin = time.perf_counter()
        dispatch = asyncio.ensure_future(self._dispatch(specs, offsets, progress))
        try:
            done, _ = await asyncio.wait({dispatch}, timeout=max(0.0, timeout_s))
            if not done:
                dispatch.cancel()
                await asyncio.gather(dispatch, return_exceptions=True)
        finally:
            progress.close()
        return PhaseOutcome(
            results=sorted(self._results, key=lambda r: r.index),
            num_planned=len(specs),
            duration_s=time.perf_counter() - self._origin,
            timed_out=not done,
        )

    async def _dispatch(
        self, specs: list[RequestSpec], offsets: list[float], progress: _Progress
    ) -> None:
        tasks: list[asyncio.Task[None]] = []
        try:
            for spec, offset in zip(specs, offsets, strict=True):
                delay = self._origin + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self._sem is not None:
                    await self._sem.acquire()
                tasks.append(asyncio.create_task(self._send(spec, progress)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _send(self, spec: RequestSpec, progress: _Progress) -> None:
        start = time.perf_counter()
        timeout_s = self._cfg.request_timeout_s
        try:
            # The backend passes the deadline to the server; wait_for is the client-side backstop.
            result = await asyncio.wait_for(
                self._backend.generate(spec, timeout_s, self._origin), timeout_s + 1.0
            )
        except asyncio.TimeoutError:
            result = self._failed(spec, start, "DEADLINE_EXCEEDED", "client-side deadline")
        except asyncio.CancelledError:
            self._results.append(self._failed(spec, start, "CANCELLED", "run timeout"))
            raise
        except Exception as exc:  # noqa: BLE001 - a server speaking nonsense must not end the run
            result = self._failed(spec, start, "ERROR", repr(exc))
        finally:
            if self._sem is not None:
                self._sem.release()
        self._results.append(result)
        progress.update(result.is_ok)

    def _failed(self, spec: RequestSpec, start: float, status: str, error: str) -> RequestResult:
        return RequestResult(
            index=spec.index,
            status=status,
            start_s=start - self._origin,
            num_prompt_tokens=spec.num_prompt_tokens or 0,
            error=error,
        )


async def run_phases(
    backend: Backend,
    warmup_specs: list[RequestSpec],
    specs: list[RequestSpec],
    cfg: RunConfig,
    timeout_s: float,
    label: str = "",
) -> tuple[PhaseOutcome, PhaseOutcome]:
    """Warmup (all at once, under the concurrency cap), then the measured phase on its arrival
    schedule. ``timeout_s`` bounds both together."""
    deadline = time.monotonic() + timeout_s
    warmup = PhaseOutcome()
    if warmup_specs:
        offsets = [0.0] * len(warmup_specs)
        warmup = await Phase(backend, cfg, f"warmup{label}").run(warmup_specs, offsets, timeout_s)
    offsets = arrival_offsets(len(specs), cfg.rate, cfg.burstiness, cfg.seed)
    remaining = deadline - time.monotonic()
    measured = await Phase(backend, cfg, f"loadtest{label}").run(specs, offsets, remaining)
    return warmup, measured
