"""Which prefix-cache partition a request runs in: the salt the router sends the scheduler.

The scheduler shares cached KV blocks only between requests with the same salt (it seeds the
hash chain of their blocks, ``scheduler/block_hash.py``). Without one, every request shares one
cache, so a caller can learn from ``usage.cached_tokens`` (or from its latency) that someone sent
the same prefix before: a side channel across tenants. Two things make a salt:

- ``--prefix-cache-isolation api-key``: the caller's API key *id* (never the key; ids are
  stable across router replicas, so a tenant shares its own cache through all of them);
- the client's own ``cache_salt`` (as vLLM's), to split one tenant's requests further.

Both go into one digest, each part named and length-prefixed, so a client's salt can never
spell another tenant's partition. ``none`` (the default) with no client salt: no salt at all,
the cache is shared as before.
"""

from __future__ import annotations

import enum
import hashlib

from pagedserve.core.errors import InvalidArgument

MAX_CACHE_SALT_BYTES = 256
_DOMAIN = b"pagedserve-cache-salt-v1"


class CacheIsolation(enum.Enum):
    """Whose requests share prefix-cache blocks: everyone's (``none``) or one API key's."""

    NONE = "none"
    API_KEY = "api-key"

    def __str__(self) -> str:  # how --help and argparse's errors name it
        return self.value


def check_cache_salt(client_salt: str, field: str = "cache_salt") -> None:
    """A client's salt is optional; when set, at most ``MAX_CACHE_SALT_BYTES`` of UTF-8."""
    if len(client_salt.encode()) > MAX_CACHE_SALT_BYTES:
        raise InvalidArgument(field, f"must be at most {MAX_CACHE_SALT_BYTES} bytes")


def request_cache_salt(isolation: CacheIsolation, key_id: str, client_salt: str) -> bytes:
    """The salt of a request by ``key_id`` with the client's ``client_salt`` (may be empty);
    empty bytes when neither applies (the shared partition)."""
    parts: list[tuple[bytes, str]] = []
    if isolation is CacheIsolation.API_KEY:
        parts.append((b"tenant", key_id))
    if client_salt:
        parts.append((b"client", client_salt))
    if not parts:
        return b""
    digest = hashlib.sha256(_DOMAIN)
    for name, value in parts:
        data = value.encode()
        digest.update(name + len(data).to_bytes(4, "big") + data)
    return digest.digest()
