"""Request deadlines, one convention for every service: a timeout in seconds from now, where 0 or
None means "no limit". A request's deadline travels with it (``SubmitRequest.timeout_s``) and each
side that waits on it enforces it with ``expire_after``: the router (so a request waiting for an
unreachable scheduler still ends on time) and the scheduler (so its blocks are freed on time)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def expire_after(timeout_s: float | None,
                 on_expiry: Callable[[], None]) -> asyncio.TimerHandle | None:
    """Calls ``on_expiry`` on the running loop once ``timeout_s`` has passed; None (no timer)
    when there is no limit. The caller cancels the handle when the request ends first."""
    if not timeout_s:
        return None
    return asyncio.get_running_loop().call_later(timeout_s, on_expiry)
