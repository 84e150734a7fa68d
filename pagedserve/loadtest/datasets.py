"""Request sets for the load test. Every generator is deterministic for a given seed.

A dataset is a list of ``RequestSpec``: one prompt (token ids *or* text) and the number of tokens
to generate. Every request is sent with ``ignore_eos`` so that ``max_tokens`` *is* its output
length; that is what makes runs comparable across servers and models.

Datasets:

- ``random``: prompt and output lengths drawn uniformly from inclusive ranges, prompt token ids
  drawn uniformly from a vocabulary range (skip the special tokens at the low end).
- ``shared-prefix``: ``num_prefixes`` random prefixes, each followed by ``suffixes_per_prefix``
  random suffixes, in a seeded shuffled order, so that a prefix cache sees repeated prefixes
  interleaved with other traffic, as in a chat service with a few system prompts.
- ``sharegpt-synthetic``: log-normal prompt and output lengths with the means reported for
  ShareGPT in the vLLM paper (Kwon et al., SOSP 2023, Fig. 11: 161.31 input and 337.99 output
  tokens on average). The spreads are our choice, wide enough to give ShareGPT's long right tail:
  ``SHAREGPT_INPUT`` and ``SHAREGPT_OUTPUT`` below. Lengths are clipped to
  ``[min_len, max_len]`` (vLLM's ShareGPT benchmark likewise drops prompts over 1024 tokens).
- ``json``: a file ``[{"prompt": "text" | "prompt_token_ids": [..], "max_tokens": N}, ...]``,
  cycled in order when more requests are asked for than the file holds.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeGuard

DATASET_NAMES = ("random", "shared-prefix", "sharegpt-synthetic", "json")


class DatasetError(ValueError):
    """A dataset cannot be built: a bad option or a malformed request file."""


@dataclass(frozen=True)
class RequestSpec:
    """One request to send. Exactly one of ``prompt_token_ids`` and ``prompt_text`` is set."""

    index: int
    max_tokens: int
    prompt_token_ids: tuple[int, ...] | None = None
    prompt_text: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt_token_ids is None) == (self.prompt_text is None):
            raise DatasetError("a request needs exactly one of prompt_token_ids and prompt_text")
        if self.max_tokens < 1:
            raise DatasetError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def num_prompt_tokens(self) -> int | None:
        """Known only for token-id prompts; text prompts are counted by the server."""
        return None if self.prompt_token_ids is None else len(self.prompt_token_ids)


@dataclass(frozen=True)
class LogNormal:
    """A log-normal length distribution given by its mean (in tokens) and sigma (of the log)."""

    mean: float
    sigma: float

    @property
    def mu(self) -> float:
        # mean = exp(mu + sigma^2 / 2)
        return math.log(self.mean) - self.sigma**2 / 2

    def sample(self, rng: random.Random, min_len: int, max_len: int) -> int:
        return min(max_len, max(min_len, round(rng.lognormvariate(self.mu, self.sigma))))


# Means from the vLLM paper's ShareGPT statistics; sigmas chosen (median input ~98 tokens,
# median output ~245 tokens) to reproduce the paper's long-tailed histograms.
SHAREGPT_INPUT = LogNormal(mean=161.31, sigma=1.0)
SHAREGPT_OUTPUT = LogNormal(mean=337.99, sigma=0.8)


@dataclass(frozen=True)
class DatasetConfig:
    """Options of every dataset; each generator reads the ones it needs. Ranges are inclusive."""

    name: str = "random"
    seed: int = 0
    input_len: tuple[int, int] = (128, 128)
    output_len: tuple[int, int] = (128, 128)
    vocab_range: tuple[int, int] = (1000, 30000)
    num_prefixes: int = 4
    suffixes_per_prefix: int = 8
    prefix_len: int = 256
    suffix_len: int = 32
    max_input_len: int = 1024
    max_output_len: int = 1024
    path: str | None = None

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise DatasetError(f"unknown dataset {self.name!r}; choose one of {DATASET_NAMES}")
        for label, (lo, hi), least in (
            ("--input-len", self.input_len, 1),
            ("--output-len", self.output_len, 1),
            ("--vocab-range", self.vocab_range, 0),
        ):
            if lo < least or hi < lo:
                raise DatasetError(f"{label}: need {least} <= MIN <= MAX, got {lo}:{hi}")
        for label, value in (
            ("--num-prefixes", self.num_prefixes),
            ("--suffixes-per-prefix", self.suffixes_per_prefix),
            ("--prefix-len", self.prefix_len),
            ("--max-input-len", self.max_input_len),
            ("--max-output-len", self.max_output_len),
        ):
            if value < 1:
                raise DatasetError(f"{label} must be >= 1, got {value}")
        if self.suffix_len < 0:
            raise DatasetError(f"--suffix-len must be >= 0, got {self.suffix_len}")
        if self.name == "json" and not self.path:
            raise DatasetError("--dataset json needs --dataset-path FILE")


def build_dataset(cfg: DatasetConfig, num_requests: int) -> list[RequestSpec]:
    """Returns exactly ``num_requests`` requests, indexed 0..num_requests-1."""
    if num_requests < 1:
        raise DatasetError(f"need at least one request, got {num_requests}")
    rng = random.Random(cfg.seed)
    if cfg.name == "random":
        return _random(cfg, num_requests, rng)
    if cfg.name == "shared-prefix":
        return _shared_prefix(cfg, num_requests, rng)
    if cfg.name == "sharegpt-synthetic":
        return _sharegpt_synthetic(cfg, num_requests, rng)
    assert cfg.path is not None  # checked in DatasetConfig
    return _cycle(load_json_requests(cfg.path), num_requests)


def _token_ids(rng: random.Random, vocab_range: tuple[int, int], n: int) -> tuple[int, ...]:
    lo, hi = vocab_range
    return tuple(rng.randint(lo, hi) for _ in range(n))


def _random(cfg: DatasetConfig, num: int, rng: random.Random) -> list[RequestSpec]:
    specs = []
    for i in range(num):
        num_in = rng.randint(*cfg.input_len)
        num_out = rng.randint(*cfg.output_len)
        specs.append(
            RequestSpec(i, num_out, prompt_token_ids=_token_ids(rng, cfg.vocab_range, num_in))
        )
    return specs


def _shared_prefix(cfg: DatasetConfig, num: int, rng: random.Random) -> list[RequestSpec]:
    """Groups of ``suffixes_per_prefix`` prompts per prefix, shuffled; repeated to reach ``num``."""
    prefixes = [_token_ids(rng, cfg.vocab_range, cfg.prefix_len) for _ in range(cfg.num_prefixes)]
    prompts = [
        prefix + _token_ids(rng, cfg.vocab_range, cfg.suffix_len)
        for prefix in prefixes
        for _ in range(cfg.suffixes_per_prefix)
    ]
    rng.shuffle(prompts)
    return [
        RequestSpec(i, rng.randint(*cfg.output_len), prompt_token_ids=prompts[i % len(prompts)])
        for i in range(num)
    ]


def _sharegpt_synthetic(cfg: DatasetConfig, num: int, rng: random.Random) -> list[RequestSpec]:
    specs = []
    for i in range(num):
        num_in = SHAREGPT_INPUT.sample(rng, 4, cfg.max_input_len)
        num_out = SHAREGPT_OUTPUT.sample(rng, 1, cfg.max_output_len)
        specs.append(
            RequestSpec(i, num_out, prompt_token_ids=_token_ids(rng, cfg.vocab_range, num_in))
        )
    return specs


def _cycle(specs: list[RequestSpec], num: int) -> list[RequestSpec]:
    return [replace(specs[i % len(specs)], index=i) for i in range(num)]


def load_json_requests(path: str | Path) -> list[RequestSpec]:
    """Parses a request file; raises ``DatasetError`` naming the file, the entry and the field."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{path}: expected a non-empty JSON list of request objects")
    return [_parse_entry(path, i, entry) for i, entry in enumerate(data)]


def _parse_entry(path: str | Path, i: int, entry: Any) -> RequestSpec:
    where = f"{path}: entry {i}"
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
    unknown = set(entry) - {"prompt", "prompt_token_ids", "max_tokens"}
    if unknown:
        raise DatasetError(f"{where}: unknown field(s) {sorted(unknown)}")
    max_tokens = entry.get("max_tokens")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise DatasetError(f"{where}: 'max_tokens' must be a positive integer, got {max_tokens!r}")
    has_text, has_ids = "prompt" in entry, "prompt_token_ids" in entry
    if has_text == has_ids:
        raise DatasetError(f"{where}: give exactly one of 'prompt' and 'prompt_token_ids'")
    if has_text:
        text = entry["prompt"]
        if not isinstance(text, str) or not text:
            raise DatasetError(f"{where}: 'prompt' must be a non-empty string")
        return RequestSpec(i, max_tokens, prompt_text=text)
    ids = entry["prompt_token_ids"]
    if not isinstance(ids, list) or not ids or not all(_is_int(t) and t >= 0 for t in ids):
        raise DatasetError(
            f"{where}: 'prompt_token_ids' must be a non-empty list of non-negative integers"
        )
    return RequestSpec(i, max_tokens, prompt_token_ids=tuple(ids))


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
