"""Router metrics: what a client sees of each request (outcome, tokens, latency), per protocol.

The router is where a request starts and ends for the client, so the request-latency
histograms live here and carry the vLLM latency names. Engine-state vLLM names (queue
sizes, KV usage, token counters) are exported by the scheduler instead, so that every
``vllm:*`` series comes from exactly one job and ``sum()`` never double counts.

Every series carries ``protocol``: ``grpc`` (the ``Generation`` service) or ``http`` (the
OpenAI-compatible API). Both are recorded by the same code (``router/generation.py``); an HTTP
request's ``code`` is the gRPC status its HTTP status was mapped from, so one set of outcomes and
codes covers both. Both protocols' series exist from the start (at 0).

Call order for one request (``router/generation.py``)::

    with metrics.track_stream(protocol):              # in-flight gauge
        metrics.observe_ttft(s, protocol)             # once, at the first streamed token
        metrics.observe_inter_token(s, protocol)      # for every later token
        ...
        metrics.request_finished(outcome, code, prompt_tokens, generated_tokens, e2e_s, ttft_s,
                                 protocol=protocol)

Per API key (``key_id`` is the id from the key file, never the key; ``anonymous`` while
authentication is off), recorded by ``router/generation.py``::

    metrics.key_request(key_id)                       # an authenticated request
    metrics.key_tokens(key_id, n)                     # prompt tokens at admission, generated ones
    metrics.key_rate_limited(key_id, limit)           # refused: limit "requests" or "tokens"

Queue time (submitted -> first scheduled) is only known to the scheduler, which exports it as
``pagedserve_scheduler_request_queue_time_seconds`` (alias ``vllm:request_queue_time_seconds``).
Each router server builds its own ``RouterMetrics`` in its own registry (``router/server.py``),
so several routers in one test process never mix counts.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pagedserve.core.metrics_server import AliasCollector

PREFIX = "pagedserve_router"

#: Allowed ``protocol`` label values: the public APIs that carry requests.
PROTOCOLS = ("grpc", "http")
#: Allowed ``limit`` label values of the rate-limit counter.
RATE_LIMITS = ("requests", "tokens")
#: Allowed ``outcome`` label values; a fixed set keeps label cardinality bounded.
OUTCOMES = ("ok", "cancelled", "deadline_exceeded", "rejected", "error")
_OUTCOME_BY_CODE = {
    "OK": "ok",
    "CANCELLED": "cancelled",
    "DEADLINE_EXCEEDED": "deadline_exceeded",
    "INVALID_ARGUMENT": "rejected",
    "RESOURCE_EXHAUSTED": "rejected",
    "UNAUTHENTICATED": "rejected",
    "PERMISSION_DENIED": "rejected",
    "FAILED_PRECONDITION": "rejected",
    "OUT_OF_RANGE": "rejected",
}

# Buckets follow vLLM's so that the two sets of quantiles are comparable.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
                         0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_LATENCY_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
                           20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)

#: vLLM name -> pagedserve name (exposed names: counters with ``_total``).
VLLM_NAME_MAP: dict[str, str] = {
    "vllm:time_to_first_token_seconds": f"{PREFIX}_time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds": f"{PREFIX}_inter_token_latency_seconds",
    "vllm:time_per_output_token_seconds": f"{PREFIX}_time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds": f"{PREFIX}_e2e_request_latency_seconds",
}


def outcome_for_code(code: str) -> str:
    """The ``outcome`` label for a gRPC status name: client-side refusals are "rejected"."""
    return _OUTCOME_BY_CODE.get(code, "error")


class RouterMetrics:
    """Owns the router's metric objects inside one registry.

    Invariant: every method is cheap (a few lock-protected float updates) and safe to
    call from any thread or from the asyncio loop.
    """

    def __init__(self, registry: CollectorRegistry, model_name: str = "") -> None:
        self.registry = registry
        self.requests = Counter(
            f"{PREFIX}_requests", "Finished requests by protocol, outcome and gRPC status code.",
            ["protocol", "outcome", "code"], registry=registry)
        self.streams_in_flight = Gauge(
            f"{PREFIX}_streams_in_flight", "Generation requests currently open.", ["protocol"],
            registry=registry)
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of accepted requests.", ["protocol"],
            registry=registry)
        self.generated_tokens = Counter(
            f"{PREFIX}_generated_tokens",
            "Tokens streamed back to clients (counted when their request ends).", ["protocol"],
            registry=registry)
        self._build_histograms(registry)
        self._build_key_counters(registry)
        for protocol in PROTOCOLS:  # every protocol's series exists (at 0) from the start
            for metric in (self.streams_in_flight, self.prompt_tokens, self.generated_tokens,
                           self.ttft, self.inter_token, self.tpot, self.e2e):
                metric.labels(protocol=protocol)
        registry.register(AliasCollector(
            [self.ttft, self.inter_token, self.tpot, self.e2e],
            VLLM_NAME_MAP, {"model_name": model_name} if model_name else None))

    def _build_histograms(self, registry: CollectorRegistry) -> None:
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Request arrival to first streamed token.",
            ["protocol"], buckets=TTFT_BUCKETS, registry=registry)
        self.inter_token = Histogram(
            f"{PREFIX}_inter_token_latency_seconds", "Gap between consecutive streamed tokens.",
            ["protocol"], buckets=TOKEN_LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Per request: (e2e - ttft) / (generated tokens - 1).",
            ["protocol"], buckets=TOKEN_LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Request arrival to stream end, for requests that reached the scheduler.",
            ["protocol"], buckets=REQUEST_LATENCY_BUCKETS, registry=registry)

    def _build_key_counters(self, registry: CollectorRegistry) -> None:
        self.key_requests = Counter(
            f"{PREFIX}_key_requests", "Requests authenticated with each API key (by key id).",
            ["key_id"], registry=registry)
        self.key_token_count = Counter(
            f"{PREFIX}_key_tokens",
            "Tokens charged to each API key's rate limit: prompt and generated.",
            ["key_id"], registry=registry)
        self.key_rate_limited_count = Counter(
            f"{PREFIX}_key_rate_limited",
            "Requests refused RESOURCE_EXHAUSTED by each API key's rate limit.",
            ["key_id", "limit"], registry=registry)

    def add_keys(self, key_ids: list[str]) -> None:
        """Creates every key's series (at 0), so a key that was never used still shows."""
        for key_id in key_ids:
            self.key_requests.labels(key_id=key_id)
            self.key_token_count.labels(key_id=key_id)
            for limit in RATE_LIMITS:
                self.key_rate_limited_count.labels(key_id=key_id, limit=limit)

    def key_request(self, key_id: str) -> None:
        self.key_requests.labels(key_id=key_id).inc()

    def key_tokens(self, key_id: str, num_tokens: int) -> None:
        self.key_token_count.labels(key_id=key_id).inc(num_tokens)

    def key_rate_limited(self, key_id: str, limit: str) -> None:
        if limit not in RATE_LIMITS:
            raise ValueError(f"limit {limit!r} is not one of {RATE_LIMITS}")
        self.key_rate_limited_count.labels(key_id=key_id, limit=limit).inc()

    def track_stream(self, protocol: str) -> AbstractContextManager[None]:
        """Context manager counting one open request (decrements on any exit path)."""
        return self.streams_in_flight.labels(protocol=_checked(protocol)).track_inprogress()

    def observe_ttft(self, seconds: float, protocol: str) -> None:
        self.ttft.labels(protocol=protocol).observe(seconds)

    def observe_inter_token(self, seconds: float, protocol: str) -> None:
        self.inter_token.labels(protocol=protocol).observe(seconds)

    def request_finished(
        self,
        outcome: str,
        code: str,
        prompt_tokens: int,
        generated_tokens: int,
        e2e_s: float | None,
        ttft_s: float | None = None,
        *,
        protocol: str,
    ) -> None:
        """Record a finished request; also its time per output token when ``ttft_s`` is known.

        ``code`` is the gRPC status name (``"OK"``, ``"CANCELLED"``...). ``e2e_s`` None (refused
        before reaching the scheduler) keeps the latency histograms free of refusals. Raises
        ``ValueError`` for an outcome outside :data:`OUTCOMES` or a protocol outside
        :data:`PROTOCOLS`.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
        self.requests.labels(protocol=_checked(protocol), outcome=outcome, code=code).inc()
        self.prompt_tokens.labels(protocol=protocol).inc(prompt_tokens)
        self.generated_tokens.labels(protocol=protocol).inc(generated_tokens)
        if e2e_s is None:
            return
        self.e2e.labels(protocol=protocol).observe(e2e_s)
        if ttft_s is not None and generated_tokens > 1:
            self.tpot.labels(protocol=protocol).observe((e2e_s - ttft_s) / (generated_tokens - 1))


def _checked(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
    return protocol

