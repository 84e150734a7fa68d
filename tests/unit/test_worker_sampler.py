"""Each sampling option does what common.proto says, batched over rows with mixed params."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pagedserve.core.sampling import TOP_K_DISABLED, make_sampling_params, resolve_sampling_params
from protos.pagedserve.v1 import common_pb2
from worker.kernels import cpu_ops
from worker.sampler import (
    ResolvedParams,
    Sampler,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
)

VOCAB = 50
EOS = 7


def _row(
    prompt: list[int] | None = None, output: list[int] | None = None, **params: object
) -> SamplingRow:
    resolved = ResolvedParams.from_proto(common_pb2.SamplingParams(**params))  # type: ignore[arg-type]
    return SamplingRow(resolved, np.array(prompt or [1, 2], dtype=np.int64),
                       np.array(output or [], dtype=np.int64))


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _draws(sampler: Sampler, logits: torch.Tensor, row: SamplingRow, n: int) -> set[int]:
    return set(sampler.sample(logits.expand(n, -1).contiguous(), [row] * n).token_ids)


def test_unset_fields_resolve_to_documented_defaults() -> None:
    p = ResolvedParams.from_proto(common_pb2.SamplingParams())
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, TOP_K_DISABLED, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.min_tokens == 0 and p.num_logprobs == 0


def test_greedy_rows_are_exact_argmax_even_beside_sampled_rows() -> None:
    logits = _logits(4)
    rows = [_row(temperature=0.0), _row(temperature=1.5), _row(temperature=0.0), _row()]
    out = Sampler([EOS], seed=0).sample(logits, rows)
    argmax = logits.argmax(-1).tolist()
    assert out.token_ids[0] == argmax[0] and out.token_ids[2] == argmax[2]


def test_top_k_restricts_support_to_k_most_likely() -> None:
    logits = _logits(1)
    allowed = set(logits[0].topk(3).indices.tolist())
    drawn = _draws(Sampler([EOS], seed=1), logits, _row(top_k=3, temperature=5.0), 400)
    assert drawn <= allowed and len(drawn) == 3


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.7]))
    assert torch.isfinite(kept[0]).tolist() == [True, True, False, False]
    only_top = apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.1]))
    assert torch.isfinite(only_top[0]).tolist() == [True, False, False, False]


def test_top_k_and_top_p_apply_per_row() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    out = apply_top_k_top_p(logits, torch.tensor([1, 0]), torch.tensor([1.0, 0.9]))
    assert torch.isfinite(out).sum(-1).tolist() == [1, 3]


def test_min_p_drops_tokens_below_fraction_of_top() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = apply_min_p(logits, torch.tensor([0.4]))  # threshold 0.2
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    row = SamplingRow(ResolvedParams(repetition_penalty=2.0), np.array([0]), np.array([1]))
    out = apply_penalties(logits.clone(), [row])
    assert out[0].tolist() == [1.0, -4.0, 2.0, -2.0, 1.0]


def test_frequency_and_presence_penalties_count_only_output_tokens() -> None:
    logits = torch.zeros(1, 5)
    row = SamplingRow(ResolvedParams(frequency_penalty=0.5, presence_penalty=1.0),
                      np.array([4, 4]), np.array([1, 1, 1, 2]))
    out = apply_penalties(logits, [row])
    assert out[0].tolist() == pytest.approx([0.0, -2.5, -1.5, 0.0, 0.0])


def test_min_tokens_suppresses_eos_and_stop_ids_until_reached() -> None:
    """The stop set arrives resolved: EOS joined ``stop_token_ids`` where the request was
    resolved (``pagedserve.core.sampling``), and the sampler suppresses exactly that set."""
    logits = torch.zeros(2, VOCAB)
    logits[:, EOS] = 100.0
    logits[:, 9] = 50.0
    resolved = resolve_sampling_params(
        make_sampling_params(temperature=0.0, min_tokens=2, stop_token_ids=[9]),
        num_prompt_tokens=2, max_model_len=64, max_tokens_limit=64, eos_token_ids=[EOS])
    assert list(resolved.stop_token_ids) == [9, EOS]
    params = ResolvedParams.from_proto(resolved)
    prompt = np.array([1, 2], dtype=np.int64)
    rows = [SamplingRow(params, prompt, np.array([3], dtype=np.int64)),
            SamplingRow(params, prompt, np.array([3, 4], dtype=np.int64))]
    out = Sampler().sample(logits, rows)
    assert out.token_ids[0] not in (EOS, 9)
    assert out.token_ids[1] == EOS


def test_min_tokens_blocks_eos_even_when_eos_is_ignored() -> None:
    """vLLM and Hugging Face's ``min_new_tokens`` keep EOS out until ``min_tokens`` outputs,
    ``ignore_eos`` or not (a greedy run with min_tokens = max_tokens and ignore_eos must give the
    same tokens as theirs); past it, an ignored EOS is an ordinary token."""
    logits = torch.zeros(2, VOCAB)
    logits[:, EOS] = 100.0
    resolved = resolve_sampling_params(
        make_sampling_params(temperature=0.0, min_tokens=2, ignore_eos=True),
        num_prompt_tokens=2, max_model_len=64, max_tokens_limit=64, eos_token_ids=[EOS])
    assert EOS not in resolved.stop_token_ids
    params = ResolvedParams.from_proto(resolved)
    prompt = np.array([1, 2], dtype=np.int64)
    rows = [SamplingRow(params, prompt, np.array([3], dtype=np.int64)),
            SamplingRow(params, prompt, np.array([3, 4], dtype=np.int64))]
    out = Sampler([EOS]).sample(logits, rows)
    assert out.token_ids == [int(logits[0, :EOS].argmax()), EOS]


def test_seeded_sampling_is_reproducible_across_batch_compositions() -> None:
    logits = _logits(3, seed=5)
    seeded = _row(seed=1234, temperature=1.0, output=[1, 2, 3])
    alone = Sampler([EOS]).sample(logits[1:2], [seeded]).token_ids[0]
    batch = [_row(temperature=0.7), seeded, _row(temperature=0.0)]
    mixed = Sampler([EOS]).sample(logits, batch).token_ids[1]
    reordered = Sampler([EOS], seed=99).sample(logits[[1, 0]], [seeded, batch[0]]).token_ids[0]
    assert alone == mixed == reordered


def test_seeded_draws_vary_with_output_position() -> None:
    logits = torch.zeros(1, VOCAB)  # uniform: any position-independence would show
    tokens = {Sampler([EOS]).sample(logits, [_row(seed=3, output=[0] * pos)]).token_ids[0]
              for pos in range(20)}
    assert len(tokens) > 5


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(probs)[None].expand(4000, -1).contiguous()
    out = Sampler([EOS], seed=0).sample(logits, [_row()] * 4000).token_ids
    freq = np.bincount(out, minlength=3) / 4000
    assert freq == pytest.approx(probs.numpy(), abs=0.03)


def test_logprobs_are_raw_log_softmax_and_sum_to_one() -> None:
    logits = _logits(2)
    rows = [_row(temperature=0.0, logprobs=5), _row(temperature=2.0, top_k=2, logprobs=VOCAB)]
    out = Sampler([EOS], seed=0).sample(logits, rows)
    raw = torch.log_softmax(logits, -1)
    assert len(out.top_logprobs[0]) == 5
    assert [t for t, _ in out.top_logprobs[0]] == raw[0].topk(5).indices.tolist()
    assert math.fsum(math.exp(lp) for _, lp in out.top_logprobs[1]) == pytest.approx(1.0, abs=1e-5)
    for i in range(2):
        assert out.logprobs[i] == pytest.approx(float(raw[i, out.token_ids[i]]), abs=1e-6)


def test_rows_without_logprobs_get_no_top_list() -> None:
    rows = [_row(temperature=0.0), _row(temperature=0.0, logprobs=2)]
    out = Sampler([EOS]).sample(_logits(2), rows)
    assert out.top_logprobs[0] == [] and len(out.top_logprobs[1]) == 2


@pytest.mark.parametrize("vocab", [VOCAB, 49152, 16 * 7 + 3])
def test_plain_greedy_batch_matches_the_staged_path(vocab: int, cpu_isa: str) -> None:
    """An all-greedy batch without penalties takes one fused kernel (fp32 CPU); it must pick
    torch.argmax's token (the first of tied maxima) with the same logprob within 1e-5, on every
    instruction-set variant."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, vocab, generator=gen) * 4
    logits[1, [5, vocab - 1]] = 100.0  # a tie: the first index wins
    logits[2, vocab - 1] = 100.0  # the maximum in the tail past the last full vector
    logits[3, 0] = 100.0
    logits[4, 7] = float("-inf")
    rows = [_row(temperature=0.0)] * 9
    sampler = Sampler([EOS])
    staged = sampler._with_logprobs(logits, logits.argmax(-1), rows)  # the general path
    out = sampler.sample(logits, rows)
    # The fused kernel ran (unless the C++ kernels are off: PAGEDSERVE_CPU_KERNELS=0).
    assert (sampler._plain_greedy(logits, rows) is not None) == (cpu_ops.load() is not None)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[1:4] == [5, vocab - 1, 0]
    np.testing.assert_allclose(out.logprobs, staged.logprobs, rtol=1e-5, atol=1e-5)
    # Anything the kernel does not do goes the staged way.
    assert sampler._plain_greedy(logits, [_row(temperature=0.0, logprobs=2)] * 9) is None
    assert sampler._plain_greedy(logits, [_row(temperature=0.0, min_tokens=1)] * 9) is None
    assert sampler._plain_greedy(logits, [_row(temperature=0.0, presence_penalty=1)] * 9) is None


EXTREME_ROWS = [
    {"temperature": 3.4e38}, {"temperature": 1e-38}, {"repetition_penalty": 3.4e38},
    {"repetition_penalty": 1e-38}, {"temperature": 1e-38, "repetition_penalty": 3.4e38},
    {"temperature": 1.0, "top_p": 1e-38, "min_p": 1.0, "top_k": 2**31 - 1},
    {"temperature": 1.0, "min_tokens": 5, "stop_token_ids": [VOCAB + 3, -4, EOS]},
]


@pytest.mark.parametrize("params", EXTREME_ROWS)
def test_extreme_params_stay_in_their_row_and_never_raise(params: dict[str, object]) -> None:
    """Parameters that bypassed validation give that row a token in the vocabulary; the greedy
    rows beside it are still the exact argmax."""
    logits = _logits(3, seed=4)
    rows = [_row(temperature=0.0), _row(prompt=[1, 2, 3], output=[4, 5], **params),
            _row(temperature=0.0, repetition_penalty=1.2, prompt=[9])]
    out = Sampler([EOS], seed=0).sample(logits, rows)
    assert out.token_ids[0] == int(logits[0].argmax())
    assert 0 <= out.token_ids[1] < VOCAB
    assert out.token_ids[2] == int(apply_penalties(logits, rows)[2].argmax())
    assert all(math.isfinite(lp) for lp in out.logprobs)


def test_a_row_with_no_finite_probability_falls_back_to_its_raw_argmax() -> None:
    logits = _logits(2, seed=5)
    rows = [_row(temperature=1e-38), _row(temperature=1.0, seed=3)]
    out = Sampler([EOS], seed=0).sample(logits, rows)
    assert out.token_ids[0] == int(logits[0].argmax())
