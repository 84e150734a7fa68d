"""``make soak``, short: the real harness against a real ``pagedserve up`` + ``redis-server``
(tiny model), with its faults (worker 0 SIGKILLed and restarted, Redis killed and restarted)
and its hostile requests. Nothing leaks, nothing sticks, every greedy bystander completes
token-exact, and every request kind was exercised."""

from __future__ import annotations

import json

import pytest

from pagedserve.loadtest import soak
from tests.support.tiny_llama import tiny_llama_dir

pytestmark = [pytest.mark.external, pytest.mark.any_isa]  # subprocesses and redis-server


def test_short_soak_leaks_nothing_and_keeps_bystanders_exact(tmp_path, capsys) -> None:
    out = tmp_path / "soak.json"
    code = soak.main(["--model", str(tiny_llama_dir()), "--duration", "8", "--rate", "4",
                      "--num-prompts", "4", "--max-tokens", "12", "--out", str(out)])
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert soak.healthy(report)
    assert report["blocks_in_use_after_drain"] == 0 and report["streams_stuck"] == 0
    assert report["greedy_failed"] == 0 and report["greedy_mismatches"] == 0
    assert report["restarts"] >= 1  # worker 0 came back under `up`
    kinds = set(report["statuses"])
    assert {"greedy", "cancel", "deadline"} <= kinds
    assert any(k.startswith("hostile: ") for k in kinds)
    assert report["statuses"]["cancel"] == {"CANCELLED_BY_CLIENT": sum(
        report["statuses"]["cancel"].values())}
    assert "blocks in use after drain: 0" in printed
