"""Per-key rate limits at the router: requests per second and tokens per second, each a token
bucket with a burst.

A bucket holds up to ``burst`` and refills at ``rate`` per second. A request takes one from its
key's request bucket or is refused. Tokens are known only as the request runs, so the token
bucket may go into debt: a request is admitted while the bucket is not in debt, its prompt tokens
are charged at admission and its generated tokens as they stream; the next request of that key
waits until the debt is repaid. Either refusal is ``RateLimited`` (RESOURCE_EXHAUSTED) with
the seconds until a retry can succeed. Buckets are per key id, created on first use; the set of
ids is the configured keys (or ``anonymous``), so it stays bounded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from pagedserve.core.errors import RateLimited

Clock = Callable[[], float]


@dataclass(frozen=True)
class RateLimitConfig:
    """``requests_per_s``/``tokens_per_s`` 0 = that limit is off. A burst of None is one second's
    worth (at least 1)."""

    requests_per_s: float = 0.0
    request_burst: float | None = None
    tokens_per_s: float = 0.0
    token_burst: float | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_s", "tokens_per_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--rate-limit-{_flag(name)} must be >= 0 (0 = off)")
        for name in ("request_burst", "token_burst"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 1):
                raise ValueError(f"--rate-limit-{_flag(name)} must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.requests_per_s > 0 or self.tokens_per_s > 0


def _flag(name: str) -> str:
    return {"requests_per_s": "rps", "tokens_per_s": "tps", "request_burst": "burst",
            "token_burst": "token-burst"}[name]


class TokenBucket:
    """``level`` in [-inf, burst]; refills at ``rate`` per second of ``clock``."""

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self.level = burst
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.burst, self.level + (now - self._updated) * self.rate)
        self._updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0 = now)."""
        self._refill()
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> None:
        """Takes ``amount``; the level may go negative (debt)."""
        self._refill()
        self.level -= amount


def _burst(burst: float | None, rate: float) -> float:
    return burst if burst is not None else max(1.0, math.ceil(rate))


class RateLimiter:
    """The buckets of every key id, and the one admission rule for both limits."""

    def __init__(self, config: RateLimitConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def _bucket(self, buckets: dict[str, TokenBucket], key_id: str, rate: float,
                burst: float | None) -> TokenBucket:
        bucket = buckets.get(key_id)
        if bucket is None:
            bucket = buckets[key_id] = TokenBucket(rate, _burst(burst, rate), self._clock)
        return bucket

    def admit_request(self, key_id: str) -> None:
        """Takes one request, or raises ``RateLimited`` (limit "requests" or "tokens": a key
        in token debt is refused before it spends a request)."""
        c = self.config
        if c.tokens_per_s > 0:
            tokens = self._bucket(self._tokens, key_id, c.tokens_per_s, c.token_burst)
            wait = tokens.wait_s(0.0)  # > 0 while the key is in debt
            if wait > 0:
                raise LimitExceeded("tokens", key_id, wait)
        if c.requests_per_s > 0:
            requests = self._bucket(self._requests, key_id, c.requests_per_s, c.request_burst)
            wait = requests.wait_s(1.0)
            if wait > 0:
                raise LimitExceeded("requests", key_id, wait)
            requests.take(1.0)

    def charge_tokens(self, key_id: str, num_tokens: int) -> None:
        """Charges tokens a request used (prompt at admission, generated as they stream)."""
        c = self.config
        if c.tokens_per_s > 0 and num_tokens > 0:
            self._bucket(self._tokens, key_id, c.tokens_per_s, c.token_burst).take(num_tokens)


class LimitExceeded(RateLimited):
    """``limit`` ("requests" or "tokens") of ``key_id`` is spent for ``retry_after_s``."""

    def __init__(self, limit: str, key_id: str, retry_after_s: float) -> None:
        super().__init__(f"rate limit: {limit} per second of API key {key_id!r} exceeded; "
                         f"retry in {retry_after_s:.1f}s", retry_after_s)
        self.limit = limit
        self.key_id = key_id
