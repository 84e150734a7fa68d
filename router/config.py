"""Router configuration: one frozen dataclass, built once from CLI > environment > defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from pagedserve.core.grpc_util import TlsConfig, add_tls_arguments, tls_config_from_args
from router.cache_salt import CacheIsolation
from router.rate_limit import RateLimitConfig

ENV_PREFIX = "PAGEDSERVE_ROUTER_"
DEFAULT_MAX_PROMPT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Where the router listens: loopback unless told (``--host 0.0.0.0``, as the Helm chart
    and the container image pass). ``port`` 0 picks a free port (tests). ``http_port`` serves
    the OpenAI-compatible HTTP API beside gRPC (None = off; 0 = any free port). ``tls`` secures
    both ports (with its CA set, clients need a certificate) and is the router's certificate
    towards the scheduler."""

    host: str = "127.0.0.1"
    port: int = 50051
    grace_s: float = 5.0
    metrics_port: int | None = None  # None = no Prometheus endpoint; 0 = any free port
    http_port: int | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {value}")
        if self.grace_s < 0:
            raise ValueError("grace_s must be >= 0")
        self.tls.check_server()


@dataclass(frozen=True)
class RouterConfig:
    """``model`` is the tokenizer source (HF directory or .gguf; None = the packaged SmolLM2).
    ``request_timeout_s`` caps a request with no client deadline (0 = no cap). API keys come
    from ``api_key_file`` and ``api_keys`` (entries, from ``PAGEDSERVE_API_KEYS``; see
    ``router/auth.py``; none = no authentication); ``rate_limits`` apply per key.
    ``max_prompt_bytes`` caps a prompt's UTF-8 bytes before it is tokenized (a request message
    larger than it plus ``REQUEST_OVERHEAD_BYTES`` is refused by gRPC, RESOURCE_EXHAUSTED,
    before it is parsed); ``max_prompt_tokens`` caps its tokens (0 = the model's context).
    ``prefix_cache_isolation``: whose requests share prefix-cache blocks (``api-key``: only one
    key's, which needs keys; ``router/cache_salt.py``)."""

    model: str | None = None
    scheduler_address: str = "127.0.0.1:50052"
    server: ServerConfig = field(default_factory=ServerConfig)
    max_tokens_limit: int = 4096
    request_timeout_s: float = 600.0
    startup_timeout_s: float = 60.0
    served_model_name: str | None = None  # default: the scheduler's model name
    api_key_file: str | None = None
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # secrets: never in a repr
    rate_limits: RateLimitConfig = field(default_factory=RateLimitConfig)
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    max_prompt_tokens: int = 0
    prefix_cache_isolation: CacheIsolation = CacheIsolation.NONE

    def __post_init__(self) -> None:
        if self.max_tokens_limit < 1:
            raise ValueError("max_tokens_limit must be >= 1")
        if self.max_prompt_bytes < 1 or self.max_prompt_tokens < 0:
            raise ValueError("max_prompt_bytes must be >= 1 and max_prompt_tokens >= 0 "
                             "(0 = the model's context)")
        if self.request_timeout_s < 0 or self.startup_timeout_s <= 0:
            raise ValueError("request_timeout_s must be >= 0 and startup_timeout_s > 0")
        if not self.scheduler_address:
            raise ValueError("scheduler_address must be set (host:port)")
        if (self.prefix_cache_isolation is CacheIsolation.API_KEY
                and not (self.api_key_file or self.api_keys)):
            raise ValueError("--prefix-cache-isolation api-key needs API keys (--api-key-file "
                             "or PAGEDSERVE_API_KEYS): without them every caller is one tenant")


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the router's flags; each falls back to ``PAGEDSERVE_ROUTER_<NAME>``, then the
    default."""
    d, s = RouterConfig(), ServerConfig()
    group = parser.add_argument_group("router")
    group.add_argument("--model", default=_env("MODEL", d.model),
                       help="tokenizer source: HF directory or .gguf (default: packaged SmolLM2)")
    group.add_argument("--scheduler-address",
                       default=_env("SCHEDULER_ADDRESS", d.scheduler_address))
    group.add_argument("--host", default=_env("HOST", s.host))
    group.add_argument("--port", type=int, default=int(_env("PORT", str(s.port)) or s.port))
    metrics_port = _env("METRICS_PORT", None)
    group.add_argument("--metrics-port", type=int,
                       default=int(metrics_port) if metrics_port else None,
                       help="serve Prometheus /metrics on this port (unset = off, 0 = any)")
    http_port = _env("HTTP_PORT", None)
    group.add_argument("--http-port", type=int, default=int(http_port) if http_port else None,
                       help="serve the OpenAI-compatible HTTP API (/v1/completions, "
                            "/v1/chat/completions, ...) on this port (unset = off, 0 = any)")
    group.add_argument("--grace-s", type=float, default=float(_env("GRACE_S", str(s.grace_s)) or 0))
    group.add_argument("--max-tokens-limit", type=int,
                       default=int(_env("MAX_TOKENS_LIMIT", str(d.max_tokens_limit)) or 1))
    group.add_argument("--request-timeout-s", type=float,
                       default=float(_env("REQUEST_TIMEOUT_S", str(d.request_timeout_s)) or 0))
    group.add_argument("--served-model-name", default=_env("SERVED_MODEL_NAME", None))
    add_tls_arguments(group, ENV_PREFIX)
    group.add_argument("--api-key-file", default=_env("API_KEY_FILE", None),
                       help="API keys, one 'ID:KEY' (or 'KEY') a line; callers must send "
                            "'authorization: Bearer KEY' (keys are also read from "
                            "PAGEDSERVE_API_KEYS, comma-separated)")
    for flag, name, kind, text in (
            ("rps", "RATE_LIMIT_RPS", float, "requests per second per API key (0 = off)"),
            ("burst", "RATE_LIMIT_BURST", float, "request burst per key (default: 1 s worth)"),
            ("tps", "RATE_LIMIT_TPS", float,
             "prompt + generated tokens per second per API key (0 = off)"),
            ("token-burst", "RATE_LIMIT_TOKEN_BURST", float,
             "token burst per key (default: 1 s worth)")):
        raw = _env(name, None)
        default = kind(raw) if raw else (None if "burst" in flag else 0.0)
        group.add_argument(f"--rate-limit-{flag}", type=kind, default=default, help=text)
    group.add_argument("--max-prompt-bytes", type=int,
                       default=int(_env("MAX_PROMPT_BYTES", str(d.max_prompt_bytes)) or 0),
                       help="largest prompt in UTF-8 bytes, checked before tokenizing")
    group.add_argument("--max-prompt-tokens", type=int,
                       default=int(_env("MAX_PROMPT_TOKENS", str(d.max_prompt_tokens)) or 0),
                       help="largest prompt in tokens (0 = the model's context)")
    group.add_argument("--prefix-cache-isolation", type=CacheIsolation,
                       choices=list(CacheIsolation),
                       default=CacheIsolation(_env("PREFIX_CACHE_ISOLATION",
                                                   d.prefix_cache_isolation.value)),
                       help="none: every caller shares the prefix cache (cached_tokens can tell "
                            "a caller that another sent the same prefix); api-key: only "
                            "requests of the same API key share cached blocks")


def router_config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        model=args.model,
        scheduler_address=args.scheduler_address,
        server=ServerConfig(host=args.host, port=args.port, grace_s=args.grace_s,
                            metrics_port=args.metrics_port, http_port=args.http_port,
                            tls=tls_config_from_args(args)),
        max_tokens_limit=args.max_tokens_limit,
        request_timeout_s=args.request_timeout_s,
        served_model_name=args.served_model_name,
        api_key_file=args.api_key_file,
        api_keys=tuple(e for e in os.environ.get("PAGEDSERVE_API_KEYS", "").split(",")
                       if e.strip()),
        rate_limits=RateLimitConfig(args.rate_limit_rps, args.rate_limit_burst,
                                    args.rate_limit_tps, args.rate_limit_token_burst),
        max_prompt_bytes=args.max_prompt_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        prefix_cache_isolation=args.prefix_cache_isolation,
    )
