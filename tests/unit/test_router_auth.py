"""API key parsing and matching (``router/auth.py``) and the per-key token buckets
(``router/rate_limit.py``) on a fake clock."""

from __future__ import annotations

import logging

import pytest

from pagedserve.core import file_watch
from pagedserve.core.errors import RateLimited, Unauthenticated
from router.auth import ANONYMOUS, ApiKeys, parse_entry, read_entries
from router.rate_limit import RateLimitConfig, RateLimiter

KEY = "k" * 20


def test_entries_name_their_key_or_get_a_hash_id_and_never_keep_the_key(tmp_path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# comment\nalice:{KEY}  # trailing\n\n{KEY}b\n")
    keys = read_entries(str(path), [f"carol:{KEY}c"])
    assert [k.key_id for k in keys][::2] == ["alice", "carol"]
    assert keys[1].key_id.startswith("key-") and len(keys[1].key_id) == 12
    assert all(KEY not in repr(k) for k in keys)


@pytest.mark.parametrize("entry", ["short", f"a b{KEY}", f":{KEY}", f"a:{KEY},x"])
def test_bad_entries_are_refused_without_echoing_the_key(entry: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_entry(entry, "where")
    assert "where" in str(info.value) and KEY not in str(info.value)


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="alice"):
        ApiKeys.load(None, [f"alice:{KEY}", f"alice:{KEY}x"])


def test_bearer_key_maps_to_its_id_and_anything_else_is_unauthenticated() -> None:
    keys = ApiKeys.load(None, [f"alice:{KEY}", f"bob:{KEY}b"])
    assert keys.authenticate({"authorization": f"Bearer {KEY}b"}) == "bob"
    assert keys.authenticate({"authorization": f"bearer  {KEY}"}) == "alice"
    for metadata in ({}, {"authorization": KEY}, {"authorization": "Bearer "},
                     {"authorization": f"Basic {KEY}"}, {"authorization": f"Bearer {KEY}x"}):
        with pytest.raises(Unauthenticated):
            keys.authenticate(metadata)
    assert ApiKeys([]).authenticate({}) == ANONYMOUS  # no keys: authentication is off


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_an_edited_key_file_takes_effect_without_a_restart(tmp_path, monkeypatch,
                                                            caplog) -> None:
    monkeypatch.setattr(file_watch, "CHECK_INTERVAL_S", 0.0)
    path = tmp_path / "keys"
    path.write_text(f"alice:{KEY}a\n")
    keys = ApiKeys.load(str(path), [f"carol:{KEY}c"])
    reloads: list[list[str]] = []
    keys.on_reload(lambda k: reloads.append(k.key_ids))
    assert keys.authenticate(_bearer(f"{KEY}a")) == "alice"

    path.write_text(f"bob:{KEY}b\n")  # alice revoked, bob added; carol (environment) stays
    with pytest.raises(Unauthenticated):
        keys.authenticate(_bearer(f"{KEY}a"))
    assert keys.authenticate(_bearer(f"{KEY}b")) == "bob"
    assert keys.authenticate(_bearer(f"{KEY}c")) == "carol"
    assert reloads == [["bob", "carol"]]

    with caplog.at_level(logging.WARNING, logger="router.auth"):
        for broken in (f"bob:{KEY}b\nshort\n", f"bob:{KEY}b\nbob:{KEY}x\n"):
            path.write_text(broken)  # a bad line, a repeated id: the keys before stay
            assert keys.authenticate(_bearer(f"{KEY}b")) == "bob"
    assert len([r for r in caplog.records if "does not load" in r.getMessage()]) == 2
    assert all(KEY not in r.getMessage() for r in caplog.records)
    assert reloads == [["bob", "carol"]]


def test_emptying_the_key_file_never_turns_authentication_off(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(file_watch, "CHECK_INTERVAL_S", 0.0)
    path = tmp_path / "keys"
    path.write_text(f"alice:{KEY}a\n")
    keys = ApiKeys.load(str(path))
    path.write_text("# nobody\n")
    with pytest.raises(Unauthenticated):
        keys.authenticate({})
    assert keys.key_ids == ["alice"]
    path.unlink()  # a missing file, too
    assert keys.authenticate(_bearer(f"{KEY}a")) == "alice"


def test_request_bucket_allows_the_burst_then_refuses_with_the_wait_until_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimitConfig(requests_per_s=2, request_burst=3), clock)
    for _ in range(3):
        limiter.admit_request("a")
    with pytest.raises(RateLimited) as info:
        limiter.admit_request("a")
    assert info.value.retry_after_s == pytest.approx(0.5)
    limiter.admit_request("b")  # another key has its own bucket
    clock.now += 0.5
    limiter.admit_request("a")


def test_token_debt_blocks_the_key_until_repaid() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimitConfig(tokens_per_s=10, token_burst=10), clock)
    limiter.admit_request("a")
    limiter.charge_tokens("a", 30)  # 20 in debt
    with pytest.raises(RateLimited) as info:
        limiter.admit_request("a")
    assert info.value.retry_after_s == pytest.approx(2.0)
    clock.now += 2.0
    limiter.admit_request("a")


@pytest.mark.parametrize("kwargs", [{"requests_per_s": -1}, {"tokens_per_s": float("nan")},
                                    {"request_burst": 0.5}])
def test_rate_limit_config_refuses_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="--rate-limit-"):
        RateLimitConfig(**kwargs)


def test_a_key_entry_sets_its_own_limits_by_the_flags_names() -> None:
    key = parse_entry(f"alice:{KEY} rps=0 tps=500 token-burst=2000", "keys line 1")
    assert key.key_id == "alice" and dict(key.limits) == {"rps": "0", "tps": "500",
                                                          "token-burst": "2000"}
    config = RateLimitConfig(requests_per_s=1, tokens_per_s=100).with_options(dict(key.limits))
    assert (config.requests_per_s, config.tokens_per_s, config.token_burst) == (0, 500, 2000)


@pytest.mark.parametrize("options", ["rps=x", "speed=1", "rps=-1", "burst=0", "otherkeyword",
                                     f"{KEY}"])
def test_bad_limits_in_an_entry_are_refused_without_echoing_a_key(options: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_entry(f"alice:{KEY} {options}", "keys line 3")
    assert str(info.value).startswith("keys line 3: ") and KEY not in str(info.value)


def test_a_key_with_its_own_limits_is_limited_by_them_and_reload_applies_new_ones() -> None:
    clock = Clock()
    default = RateLimitConfig(requests_per_s=1, request_burst=1)
    limiter = RateLimiter(default, clock, per_key={
        "free": default.with_options({"rps": "0"}), "slow": default.with_options({"rps": "0.5"})})
    for _ in range(10):
        limiter.admit_request("free")  # its requests limit is off
    for key_id in ("other", "slow"):
        limiter.admit_request(key_id)
    with pytest.raises(RateLimited) as other:
        limiter.admit_request("other")
    with pytest.raises(RateLimited) as slow:
        limiter.admit_request("slow")
    assert (other.value.retry_after_s, slow.value.retry_after_s) == (pytest.approx(1.0),
                                                                     pytest.approx(2.0))
    limiter.set_per_key({"slow": default.with_options({"rps": "10"})})  # the key file changed
    with pytest.raises(RateLimited) as faster:
        limiter.admit_request("slow")
    assert faster.value.retry_after_s == pytest.approx(0.1)
