"""Datasets: requested counts and lengths, determinism under a seed, clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedserve.loadtest.datasets import (
    SHAREGPT_INPUT,
    SHAREGPT_OUTPUT,
    DatasetConfig,
    DatasetError,
    build_dataset,
    load_json_requests,
)


def test_random_dataset_lengths_and_vocab_within_ranges() -> None:
    cfg = DatasetConfig(
        "random", seed=3, input_len=(5, 20), output_len=(2, 9), vocab_range=(10, 50)
    )
    specs = build_dataset(cfg, 200)
    assert [s.index for s in specs] == list(range(200))
    assert all(5 <= len(s.prompt_token_ids) <= 20 for s in specs)
    assert all(2 <= s.max_tokens <= 9 for s in specs)
    assert all(10 <= t <= 50 for s in specs for t in s.prompt_token_ids)
    assert {len(s.prompt_token_ids) for s in specs} == set(range(5, 21))  # the whole range is used


def test_fixed_lengths_are_exact() -> None:
    specs = build_dataset(DatasetConfig("random", input_len=(64, 64), output_len=(7, 7)), 10)
    assert {len(s.prompt_token_ids) for s in specs} == {64}
    assert {s.max_tokens for s in specs} == {7}


@pytest.mark.parametrize("name", ["random", "shared-prefix", "sharegpt-synthetic"])
def test_same_seed_same_requests_other_seed_differs(name: str) -> None:
    assert build_dataset(DatasetConfig(name, seed=1), 20) == build_dataset(
        DatasetConfig(name, seed=1), 20
    )
    assert build_dataset(DatasetConfig(name, seed=1), 20) != build_dataset(
        DatasetConfig(name, seed=2), 20
    )


def test_shared_prefix_groups_share_exact_prefixes() -> None:
    cfg = DatasetConfig(
        "shared-prefix",
        num_prefixes=3,
        suffixes_per_prefix=4,
        prefix_len=16,
        suffix_len=5,
        output_len=(4, 4),
    )
    specs = build_dataset(cfg, 12)
    prefixes = [s.prompt_token_ids[:16] for s in specs]
    assert all(len(s.prompt_token_ids) == 21 for s in specs)
    assert sorted(prefixes.count(p) for p in set(prefixes)) == [4, 4, 4]
    assert prefixes[:4] != [prefixes[0]] * 4  # shuffled, not grouped
    # More requests than prompts: the prompt list repeats.
    assert build_dataset(cfg, 24)[12].prompt_token_ids == specs[0].prompt_token_ids


def test_sharegpt_synthetic_means_follow_the_fitted_distribution() -> None:
    cfg = DatasetConfig("sharegpt-synthetic", seed=0, max_input_len=100_000, max_output_len=100_000)
    specs = build_dataset(cfg, 4000)
    mean_in = sum(len(s.prompt_token_ids) for s in specs) / len(specs)
    mean_out = sum(s.max_tokens for s in specs) / len(specs)
    assert mean_in == pytest.approx(SHAREGPT_INPUT.mean, rel=0.1)
    assert mean_out == pytest.approx(SHAREGPT_OUTPUT.mean, rel=0.1)


def test_sharegpt_synthetic_clips_to_limits() -> None:
    specs = build_dataset(
        DatasetConfig("sharegpt-synthetic", max_input_len=50, max_output_len=40), 500
    )
    assert max(len(s.prompt_token_ids) for s in specs) == 50
    assert max(s.max_tokens for s in specs) == 40
    assert min(len(s.prompt_token_ids) for s in specs) >= 4


def test_json_dataset_mixes_text_and_ids_and_cycles(tmp_path: Path) -> None:
    path = tmp_path / "reqs.json"
    path.write_text(
        json.dumps(
            [
                {"prompt": "hello there", "max_tokens": 5},
                {"prompt_token_ids": [1, 2, 3], "max_tokens": 2},
            ]
        )
    )
    specs = build_dataset(DatasetConfig("json", path=str(path)), 5)
    assert [s.prompt_text for s in specs] == [
        "hello there",
        None,
        "hello there",
        None,
        "hello there",
    ]
    assert specs[1].prompt_token_ids == (1, 2, 3) and specs[1].num_prompt_tokens == 3
    assert [s.index for s in specs] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ("{}", "non-empty JSON list"),
        ("[]", "non-empty JSON list"),
        ('[{"prompt": "a", "max_tokens": 1}, 5]', "entry 1: expected an object"),
        ('[{"prompt": "a"}]', "entry 0: 'max_tokens' must be a positive integer, got None"),
        ('[{"prompt": "a", "max_tokens": 0}]', "'max_tokens' must be a positive integer, got 0"),
        ('[{"prompt": "a", "max_tokens": true}]', "'max_tokens' must be a positive integer"),
        ('[{"max_tokens": 3}]', "exactly one of 'prompt' and 'prompt_token_ids'"),
        ('[{"prompt": "a", "prompt_token_ids": [1], "max_tokens": 3}]', "exactly one of"),
        ('[{"prompt": "", "max_tokens": 3}]', "'prompt' must be a non-empty string"),
        ('[{"prompt_token_ids": [1, -2], "max_tokens": 3}]', "non-negative integers"),
        ('[{"prompt_token_ids": "12", "max_tokens": 3}]', "non-empty list"),
        ('[{"prompt": "a", "max_tokens": 3, "n": 2}]', "unknown field(s) ['n']"),
    ],
)
def test_json_dataset_errors_name_file_entry_and_field(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as info:
        load_json_requests(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_json_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read"):
        load_json_requests(tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="--dataset-path"):
        DatasetConfig("json")


@pytest.mark.parametrize(
    "kwargs",
    [{"input_len": (10, 5)}, {"output_len": (0, 3)}, {"prefix_len": 0}, {"name": "sharegpt"}],
)
def test_bad_options_are_rejected(kwargs: dict) -> None:
    with pytest.raises(DatasetError):
        DatasetConfig(**kwargs)
