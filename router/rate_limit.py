"""Per-key rate limits at the router: requests per second and tokens per second, each a token
bucket with a burst.

A bucket holds up to ``burst`` and refills at ``rate`` per second. A request takes one from its
key's request bucket or is refused. Tokens are known only as the request runs, so the token
bucket may go into debt: a request is admitted while the bucket is not in debt, its prompt tokens
are charged at admission and its generated tokens as they stream; the next request of that key
waits until the debt is repaid. Either refusal is ``RateLimited`` (RESOURCE_EXHAUSTED) with
the seconds until a retry can succeed. Buckets are per key id, created on first use; the set of
ids is the configured keys (or ``anonymous``), so it stays bounded.

Every key has the router's limits (``--rate-limit-*``) unless its entry in the key file sets its
own (``alice:KEY rps=20 tps=5000``; ``router/auth.py``): the options are the flags' names, each
replacing that one setting for that key (0 = that limit off for it). A key file reload applies
changed limits to the running buckets (a bucket keeps its level, at most its new burst).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace

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

    def with_options(self, options: Mapping[str, str]) -> RateLimitConfig:
        """This config with a key's own settings (``{"rps": "20"}``, named as the flags);
        ``ValueError`` for an unknown name or a bad value."""
        by_flag = {_flag(f.name): f.name for f in fields(self)}
        changes: dict[str, float] = {}
        for flag, text in options.items():
            if flag not in by_flag:
                raise ValueError(f"unknown limit {flag!r} (known: {', '.join(by_flag)})")
            try:
                changes[by_flag[flag]] = float(text)
            except ValueError:
                raise ValueError(f"{flag}={text!r} is not a number") from None
        try:
            return replace(self, **changes)
        except ValueError as exc:  # the flags' messages, for a key's option
            raise ValueError(str(exc).replace("--rate-limit-", "")) from None


_FLAGS = {"requests_per_s": "rps", "request_burst": "burst", "tokens_per_s": "tps",
          "token_burst": "token-burst"}
LIMIT_NAMES = tuple(_FLAGS.values())  # a key's own limits in the key file: the flags' names


def _flag(name: str) -> str:
    return _FLAGS[name]


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
    """The buckets of every key id, and the one admission rule for both limits. ``per_key``:
    the keys whose limits are their own (``RateLimitConfig.with_options``)."""

    def __init__(self, config: RateLimitConfig, clock: Clock = time.monotonic,
                 per_key: Mapping[str, RateLimitConfig] | None = None) -> None:
        self.config = config
        self._per_key = dict(per_key or {})
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def config_for(self, key_id: str) -> RateLimitConfig:
        return self._per_key.get(key_id, self.config)

    def set_per_key(self, per_key: Mapping[str, RateLimitConfig]) -> None:
        """New per-key limits (a key file reload); running buckets take their key's new rate
        and burst, keeping their level (at most the new burst)."""
        self._per_key = dict(per_key)
        for buckets, rate_of, burst_of in (
                (self._requests, "requests_per_s", "request_burst"),
                (self._tokens, "tokens_per_s", "token_burst")):
            for key_id, bucket in buckets.items():
                c = self.config_for(key_id)
                rate = getattr(c, rate_of)
                if rate > 0:
                    bucket.rate, bucket.burst = rate, _burst(getattr(c, burst_of), rate)
                    bucket.level = min(bucket.level, bucket.burst)

    def _bucket(self, buckets: dict[str, TokenBucket], key_id: str, rate: float,
                burst: float | None) -> TokenBucket:
        bucket = buckets.get(key_id)
        if bucket is None:
            bucket = buckets[key_id] = TokenBucket(rate, _burst(burst, rate), self._clock)
        return bucket

    def admit_request(self, key_id: str) -> None:
        """Takes one request, or raises ``RateLimited`` (limit "requests" or "tokens": a key
        in token debt is refused before it spends a request)."""
        c = self.config_for(key_id)
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
        c = self.config_for(key_id)
        if c.tokens_per_s > 0 and num_tokens > 0:
            self._bucket(self._tokens, key_id, c.tokens_per_s, c.token_burst).take(num_tokens)


class LimitExceeded(RateLimited):
    """``limit`` ("requests" or "tokens") of ``key_id`` is spent for ``retry_after_s``."""

    def __init__(self, limit: str, key_id: str, retry_after_s: float) -> None:
        super().__init__(f"rate limit: {limit} per second of API key {key_id!r} exceeded; "
                         f"retry in {retry_after_s:.1f}s", retry_after_s)
        self.limit = limit
        self.key_id = key_id
