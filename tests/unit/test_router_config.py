"""Router configuration defaults that are deliberate (issue 15)."""

from __future__ import annotations

import argparse

import pytest

from router.config import RouterConfig, add_router_arguments, router_config_from_args


def _parse(*argv: str) -> RouterConfig:
    parser = argparse.ArgumentParser()
    add_router_arguments(parser)
    return router_config_from_args(parser.parse_args(list(argv)))


def test_a_standalone_router_binds_loopback_unless_told(monkeypatch) -> None:
    monkeypatch.delenv("PAGEDSERVE_ROUTER_HOST", raising=False)
    assert _parse().server.host == "127.0.0.1"
    assert _parse("--host", "0.0.0.0").server.host == "0.0.0.0"


def test_prompt_caps_are_configurable_and_checked(monkeypatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_ROUTER_MAX_PROMPT_TOKENS", "100")
    config = _parse("--max-prompt-bytes", "5000")
    assert (config.max_prompt_bytes, config.max_prompt_tokens) == (5000, 100)
    with pytest.raises(ValueError, match="max_prompt_bytes"):
        RouterConfig(max_prompt_bytes=0)
