"""The benchmark workload: random token-id prompts with controlled lengths, fixed by a seed.

Prompt ids are drawn away from the low ids where Llama-family vocabularies keep their special
tokens, and every request ignores EOS, so each one produces exactly its requested output length.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 64
    prompt_len: tuple[int, int] = (32, 256)  # inclusive range, uniform
    output_len: tuple[int, int] = (16, 128)
    seed: int = 0

    def describe(self) -> str:
        return (f"{self.num_requests} requests, prompts {self.prompt_len[0]}-{self.prompt_len[1]} "
                f"tokens, outputs {self.output_len[0]}-{self.output_len[1]} tokens, greedy, "
                f"EOS ignored, seed {self.seed}")


def make_requests(spec: WorkloadSpec, vocab_size: int, first_id: int = 100) -> list[Request]:
    rng = random.Random(spec.seed)
    requests = []
    for _ in range(spec.num_requests):
        num_prompt = rng.randint(*spec.prompt_len)
        prompt = [rng.randrange(first_id, vocab_size) for _ in range(num_prompt)]
        requests.append(Request(prompt, rng.randint(*spec.output_len)))
    return requests


def parse_range(text: str) -> tuple[int, int]:
    """``"32:256"`` -> (32, 256); ``"64"`` -> (64, 64)."""
    lo, _, hi = text.partition(":")
    low, high = int(lo), int(hi or lo)
    if not 1 <= low <= high:
        raise ValueError(f"bad length range {text!r}: want LOW:HIGH with 1 <= LOW <= HIGH")
    return low, high
