"""API keys at the router: who is calling, by key id.

Keys come from ``--api-key-file`` (one entry a line, ``#`` comments) and from the environment
(``PAGEDSERVE_API_KEYS``, entries separated by commas). An entry is ``ID:KEY`` or a bare
``KEY``; a bare key's id is ``key-`` and the first 8 hex digits of its SHA-256. After the key,
``NAME=VALUE`` words set that key's own rate limits (``alice:KEY rps=20 tps=5000``;
``router/rate_limit.py``). The id, never the key, is what logs and metrics name. A key is at
least 16 characters, without whitespace, "#", commas or colons.

The file is read again when it changes (``pagedserve.core.file_watch``; looked at, at most once
a second, when a call authenticates): a key added works and a key removed is refused from then
on, without a restart (Kubernetes updates a mounted Secret in place). A changed file that does
not parse, repeats an id or holds no key at all (which would turn authentication off) is
logged, by line number and id only, and the keys read before stay.

A call carries its key as ``authorization: Bearer KEY`` (gRPC metadata or HTTP header). The
presented key's SHA-256 is compared with every stored digest by ``hmac.compare_digest``, all of
them each time, so the time taken says nothing about which key came close. No keys configured =
authentication off: every caller is ``ANONYMOUS``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pagedserve.core.errors import Unauthenticated
from pagedserve.core.file_watch import FileWatch
from router.rate_limit import LIMIT_NAMES, RateLimitConfig

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the key id of every call while authentication is off
MIN_KEY_LENGTH = 16
_FORBIDDEN = (",", ":", "#")


@dataclass(frozen=True)
class ApiKey:
    """One key: its id (safe to log), the SHA-256 of the key (never the key itself) and the rate
    limits it sets for itself (``{"rps": "20"}``; checked by ``RateLimitConfig.with_options``)."""

    key_id: str
    digest: bytes = field(repr=False)
    limits: tuple[tuple[str, str], ...] = ()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_entry(entry: str, where: str) -> ApiKey:
    """``ID:KEY`` or ``KEY``, then ``NAME=VALUE`` limits -> ``ApiKey``; ``ValueError`` naming
    ``where`` (not the key)."""
    first, *options = entry.split() or [""]
    limits = []
    for number, option in enumerate(options, 1):
        name, eq, value = option.partition("=")
        if not eq or name not in LIMIT_NAMES:  # never echoed: it may be a piece of a key
            raise ValueError(f"{where}: word {number} after the key is not a rate limit "
                             f"(NAME=VALUE, NAME one of {', '.join(LIMIT_NAMES)})")
        limits.append((name, value))
    try:
        RateLimitConfig().with_options(dict(limits))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    key_id, sep, key = first.partition(":")
    if not sep:
        key_id, key = "", key_id
    if len(key) < MIN_KEY_LENGTH or any(c.isspace() or c in _FORBIDDEN for c in key):
        raise ValueError(f"{where}: an API key must be at least {MIN_KEY_LENGTH} characters, "
                         "without whitespace, '#', commas or colons")
    if sep and (not key_id or any(c.isspace() for c in key_id)):
        raise ValueError(f"{where}: the key id before ':' must be a non-empty word")
    return ApiKey(key_id or "key-" + hashlib.sha256(key.encode()).hexdigest()[:8], _digest(key),
                  tuple(limits))


def read_entries(api_key_file: str | None, entries: Sequence[str] = ()) -> list[ApiKey]:
    """Every key from the file and from ``entries`` (``PAGEDSERVE_API_KEYS`` split at commas),
    in that order."""
    keys: list[ApiKey] = []
    if api_key_file:
        lines = Path(api_key_file).read_text().splitlines()
        for number, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(parse_entry(line, f"{api_key_file} line {number}"))
    for index, entry in enumerate(entries):
        keys.append(parse_entry(entry, f"PAGEDSERVE_API_KEYS entry {index + 1}"))
    return keys


class ApiKeys:
    """The router's keys. Invariant: ids are unique (two keys never share a metric series)."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._keys = _unique(list(keys))
        self._file: str | None = None
        self._entries: tuple[str, ...] = ()
        self._watch: FileWatch | None = None
        self._listeners: list[Callable[[ApiKeys], None]] = []

    @classmethod
    def load(cls, api_key_file: str | None, entries: Sequence[str] = ()) -> ApiKeys:
        """The keys of the file and ``entries``; the file is watched for changes."""
        keys = cls(read_entries(api_key_file, entries))
        if api_key_file:
            keys._file, keys._entries = api_key_file, tuple(entries)
            keys._watch = FileWatch([api_key_file])
        return keys

    def on_reload(self, listener: Callable[[ApiKeys], None]) -> None:
        """``listener(self)`` after each reload that took (the router's per-key metrics and
        rate limits)."""
        self._listeners.append(listener)

    def refresh(self) -> bool:
        """Reads the key file again if it changed; True when the new keys took."""
        if self._watch is None or not self._watch.changed():
            return False
        try:
            keys = _unique(read_entries(self._file, self._entries))
            if not keys:
                raise ValueError("no key left: that would turn authentication off (restart "
                                 "the router without keys to do that)")
        except (OSError, ValueError) as exc:  # messages name lines and ids, never a key
            logger.warning("API key file %s changed but does not load (%s); keeping the %d "
                           "keys read before", self._file, exc, len(self._keys))
            return False
        before, after = set(self.key_ids), {k.key_id for k in keys}
        self._keys = keys
        logger.info("API key file %s reloaded: %d keys (added: %s; removed: %s)", self._file,
                    len(keys), ", ".join(sorted(after - before)) or "none",
                    ", ".join(sorted(before - after)) or "none")
        for listener in self._listeners:
            listener(self)
        return True

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def key_ids(self) -> list[str]:
        return [k.key_id for k in self._keys]

    def rate_limits(self, default: RateLimitConfig) -> dict[str, RateLimitConfig]:
        """The limits of every key that sets its own (the others have ``default``)."""
        return {k.key_id: default.with_options(dict(k.limits)) for k in self._keys if k.limits}

    def authenticate(self, metadata: Mapping[str, str]) -> str:
        """The calling key's id, from ``authorization: Bearer KEY``; ``ANONYMOUS`` while no
        keys are configured. Raises ``Unauthenticated`` for a missing or unknown key."""
        self.refresh()
        if not self._keys:
            return ANONYMOUS
        presented = _bearer(metadata.get("authorization"))
        if presented is None:
            raise Unauthenticated("authorization: send 'Bearer <API key>'")
        digest = _digest(presented)
        matched = ""
        for key in self._keys:  # no early exit: constant time over the whole set
            if hmac.compare_digest(digest, key.digest):
                matched = key.key_id
        if not matched:
            raise Unauthenticated("authorization: the API key is not valid")
        return matched


def _unique(keys: list[ApiKey]) -> list[ApiKey]:
    ids = [k.key_id for k in keys]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"API key ids must be unique: {', '.join(duplicates)} repeat")
    return keys


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
