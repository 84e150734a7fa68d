"""Batched sampling over ``[N, V]`` fp32 logits, one ``SamplingParams`` per row.

Pipeline (each stage is one batched tensor op over all rows; rows that do not use a stage are
given its identity value, so there is no per-row branching)::

    raw logits ─┬─> min_tokens stop suppression -> penalties ─┬─> argmax ............ greedy rows
                │                                             └─> / temperature -> min_p -> top-k
                │                                                 -> top-p -> softmax -> draw
                └─> log_softmax -> sampled token's logprob, top-K logprobs  (from RAW logits)

Penalties follow vLLM: repetition over prompt ∪ output tokens (divide positive logits, multiply
negative ones), frequency × output count and presence × [output count > 0] subtracted.

Draws use the exponential race ``argmax(p / E)``, ``E ~ Exp(1)``, which samples from ``p``. Rows
with a seed draw ``E`` from a generator seeded by ``mix(seed, output_position)``, so a seeded
request gets the same token at the same position whatever it is batched with and however often it
is preempted and recomputed; only these draws loop over rows.

Non-finite values stay in their row: a row whose processed logits or probabilities are not
finite numbers (an extreme temperature or penalty that bypassed validation) falls back to the
argmax of its raw logits, and stop ids outside the vocabulary are ignored for that row; nothing
one row asks for raises for the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedserve.core.sampling import TOP_K_DISABLED, param_or_default
from protos.pagedserve.v1 import common_pb2
from worker.kernels import cpu_ops

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class ResolvedParams:
    """``SamplingParams`` as plain values. Defaults, and ``TOP_K_DISABLED`` for "no top-k", are
    those of ``pagedserve.core.sampling`` (the scheduler sends resolved params; an unset field reads
    as its default there). ``stop_token_ids`` is the request's whole stop set, EOS included
    unless the client ignored it: resolution put it there (``pagedserve.core.sampling``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_DISABLED
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    num_logprobs: int = 0

    @classmethod
    def from_proto(cls, p: common_pb2.SamplingParams) -> ResolvedParams:
        return cls(
            temperature=float(param_or_default(p, "temperature")),
            top_p=float(param_or_default(p, "top_p")),
            top_k=int(param_or_default(p, "top_k")),
            min_p=float(param_or_default(p, "min_p")),
            repetition_penalty=float(param_or_default(p, "repetition_penalty")),
            presence_penalty=float(param_or_default(p, "presence_penalty")),
            frequency_penalty=float(param_or_default(p, "frequency_penalty")),
            seed=int(p.seed) if p.HasField("seed") else None,
            min_tokens=int(param_or_default(p, "min_tokens")),
            stop_token_ids=tuple(p.stop_token_ids),
            num_logprobs=int(param_or_default(p, "logprobs")),
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass
class SamplingRow:
    """One row of the logits: its params and the sequence's tokens so far."""

    params: ResolvedParams
    prompt_ids: np.ndarray  # int64
    output_ids: np.ndarray  # int64

    @property
    def output_position(self) -> int:
        return int(self.output_ids.shape[0])


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per row


def mix_seed(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): a well-spread 63-bit generator seed."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class Sampler:
    """Stateless apart from the generator used for unseeded rows.

    Stopping is decided upstream from each row's ``params.stop_token_ids`` (which hold EOS unless
    the client ignored it). ``eos_token_ids`` (the model's) serve ``min_tokens`` only: until a
    row has that many outputs it cannot emit EOS even with ``ignore_eos``, as in vLLM and Hugging
    Face's ``min_new_tokens``."""

    def __init__(self, eos_token_ids: Sequence[int] = (), seed: int | None = None) -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        self._generator: torch.Generator | None = None
        self._seed = seed

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """``logits`` ``[len(rows), V]`` fp32. Greedy rows get the exact argmax of their
        (penalized) logits."""
        assert logits.shape[0] == len(rows) and logits.dtype == torch.float32
        fast = self._plain_greedy(logits, rows)
        if fast is not None:
            return fast
        processed = self._suppress_stop_tokens(logits, rows)
        processed = _rows_without_nan(apply_penalties(processed, rows), logits)
        token_ids = self._choose(processed, rows)
        return self._with_logprobs(logits, token_ids, rows)

    # ---------------------------------------------------------------------------------- stages

    def _plain_greedy(self, logits: torch.Tensor, rows: Sequence[SamplingRow]
                      ) -> SamplerOutput | None:
        """The common greedy batch (no penalties, no stop suppression, no top logprobs) on fp32
        CPU: one fused kernel for argmax and the chosen token's logprob (same token, logprob
        within rounding of the staged path). None when the stages are needed."""
        if logits.device.type != "cpu" or logits.stride(-1) != 1:
            return None
        for row in rows:
            p = row.params
            if (not p.is_greedy or p.has_penalties or p.num_logprobs
                    or row.output_position < p.min_tokens):
                return None
        ops = cpu_ops.load()
        if ops is None:
            return None
        token_ids, logprobs = ops.greedy_sample(logits)
        return SamplerOutput(token_ids.tolist(), logprobs.tolist(), [[] for _ in rows])

    def _suppress_stop_tokens(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> torch.Tensor:
        """Rows with fewer than ``min_tokens`` outputs cannot emit a token of their stop set
        nor the model's EOS (also under ``ignore_eos``: see the class)."""
        row_idx: list[int] = []
        tok_idx: list[int] = []
        vocab = logits.shape[1]
        for i, row in enumerate(rows):
            if row.output_position >= row.params.min_tokens:
                continue
            stops = {t for t in set(row.params.stop_token_ids).union(self.eos_token_ids)
                     if 0 <= t < vocab}
            row_idx.extend([i] * len(stops))
            tok_idx.extend(stops)
        if not row_idx:
            return logits
        logits = logits.clone()
        rows_t = torch.tensor(row_idx, device=logits.device)
        toks_t = torch.tensor(tok_idx, device=logits.device)
        logits[rows_t, toks_t] = float("-inf")
        return logits

    def _choose(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        greedy = [r.params.is_greedy for r in rows]
        argmax = logits.argmax(dim=-1)
        if all(greedy):
            return argmax
        dev = logits.device
        temps = torch.tensor(
            [1.0 if g else r.params.temperature for g, r in zip(greedy, rows, strict=True)],
            device=dev)
        scaled = logits / temps[:, None]
        scaled = apply_min_p(scaled, torch.tensor([r.params.min_p for r in rows], device=dev))
        scaled = apply_top_k_top_p(
            scaled,
            torch.tensor([r.params.top_k for r in rows], device=dev),
            torch.tensor([r.params.top_p for r in rows], device=dev),
        )
        probs = torch.softmax(scaled, dim=-1)
        drawn = (probs / self._exponential_noise(probs, rows)).argmax(dim=-1)
        use_argmax = torch.tensor(greedy, device=dev) | ~torch.isfinite(probs).all(dim=-1)
        return torch.where(use_argmax, argmax, drawn)

    def _exponential_noise(self, probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        generator = self._unseeded_generator(probs.device)
        noise = torch.empty_like(probs).exponential_(generator=generator)
        for i, row in enumerate(rows):
            if row.params.seed is None or row.params.is_greedy:
                continue
            gen = torch.Generator(device=probs.device)
            gen.manual_seed(mix_seed(row.params.seed, row.output_position))
            noise[i].exponential_(generator=gen)
        return noise

    def _unseeded_generator(self, device: torch.device) -> torch.Generator | None:
        if self._seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed)
        return self._generator

    def _with_logprobs(
        self, raw: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> SamplerOutput:
        max_k = max((r.params.num_logprobs for r in rows), default=0)
        if max_k == 0:  # only the chosen token's logprob: no [N, V] log_softmax to write
            chosen = raw.gather(1, token_ids[:, None]).squeeze(1) - torch.logsumexp(raw, dim=-1)
            return SamplerOutput(token_ids.tolist(), chosen.tolist(), [[] for _ in rows])
        logprobs = torch.log_softmax(raw, dim=-1)
        chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
        out = SamplerOutput(token_ids.tolist(), chosen.tolist(), [[] for _ in rows])
        if max_k > 0:
            top_vals, top_ids = logprobs.topk(min(max_k, raw.shape[1]), dim=-1)
            vals, ids = top_vals.tolist(), top_ids.tolist()
            for i, row in enumerate(rows):
                k = row.params.num_logprobs
                out.top_logprobs[i] = list(zip(ids[i][:k], vals[i][:k], strict=True))
        return out


# -------------------------------------------------------------------------- batched transforms


def _rows_without_nan(processed: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """``processed`` with every row that holds a NaN, or nothing above ``-inf``, replaced by its
    raw logits (see the module)."""
    if processed is raw:
        return processed
    bad = (torch.isnan(processed).any(dim=-1, keepdim=True)
           | torch.isneginf(processed).all(dim=-1, keepdim=True))
    return torch.where(bad, raw, processed) if bool(bad.any()) else processed


def token_counts(
    token_lists: Sequence[np.ndarray], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """``[N, V]`` counts of each token id per row: one accumulating scatter over all tokens."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    counts = torch.zeros(len(token_lists), vocab_size, device=device)
    if lengths.sum() == 0:
        return counts
    flat = torch.from_numpy(np.concatenate(token_lists).astype(np.int64)).to(device)
    row = torch.from_numpy(np.repeat(np.arange(len(token_lists)), lengths)).to(device)
    counts.index_put_((row, flat), torch.ones_like(flat, dtype=counts.dtype), accumulate=True)
    return counts


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    if not any(r.params.has_penalties for r in rows):
        return logits
    dev, vocab = logits.device, logits.shape[1]
    output_counts = token_counts([r.output_ids for r in rows], vocab, dev)
    prompt_counts = token_counts([r.prompt_ids for r in rows], vocab, dev)
    seen = (output_counts > 0) | (prompt_counts > 0)
    rep = torch.tensor([r.params.repetition_penalty for r in rows], device=dev)[:, None]
    freq = torch.tensor([r.params.frequency_penalty for r in rows], device=dev)[:, None]
    pres = torch.tensor([r.params.presence_penalty for r in rows], device=dev)[:, None]
    penalty = torch.where(seen, rep, torch.ones_like(rep))
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    return logits - freq * output_counts - pres * (output_counts > 0).float()


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drops tokens whose probability is below ``min_p`` × the row's top probability."""
    if not bool((min_p > 0).any()):
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Top-k (``TOP_K_DISABLED``, or any k < 1, = off) then top-p over the top-k-renormalised
    distribution; the most likely token always survives."""
    use_k, use_p = bool((top_k > 0).any()), bool((top_p < 1.0).any())
    if not (use_k or use_p):
        return logits
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    if use_k:
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
        sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    if use_p:
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before > top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
