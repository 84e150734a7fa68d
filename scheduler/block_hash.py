"""Content hashes of full KV blocks, stable across processes (they are stored in Redis).

``hash(block i) = H(hash(block i-1) || extra || token ids of block i)``: equal hashes mean equal
KV content *including everything before the block*, because a token's K/V depend on every earlier
token. ``extra`` separates models (and, later, LoRA adapters) sharing one index.

The parent of a chain's first block is its *root*: ``None`` for the shared partition, or
``chain_root(cache_salt)`` for a request with a cache salt (a tenant, a client's own salt). The
salt enters the first block's hash only; the chain carries it to every later block, so requests
with different salts never share a block, and requests with the same salt share as before::

    root(salt) ──▶ hash(block 0) ──▶ hash(block 1) ──▶ ...
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

HASH_SIZE = 16  # bytes of a block hash
NONE_HASH = b"\x00" * HASH_SIZE
# A salted root is tagged and longer than a block hash, so a stored entry whose parent is a root
# is recognisably the start of a chain (never an orphan whose parent was not stored).
_ROOT_TAG = b"salt"
_ROOT_PERSON = b"pagedserve-salt"


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    h = hashlib.blake2b(parent or NONE_HASH, digest_size=HASH_SIZE)
    h.update(extra)
    h.update(array("i", token_ids).tobytes())
    return h.digest()


def hash_full_blocks(
    token_ids: Sequence[int], block_size: int, extra: bytes = b"", start_parent: bytes | None = None
) -> list[bytes]:
    """Hashes of every full block of ``token_ids``, in order, the first one's parent being
    ``start_parent`` (a chain root, or the hash of the block before ``token_ids``)."""
    hashes: list[bytes] = []
    parent = start_parent
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra)
        hashes.append(parent)
    return hashes


def chain_root(cache_salt: bytes) -> bytes | None:
    """The parent hash of the first block of a request with ``cache_salt``; ``None`` (the shared
    partition) without one."""
    if not cache_salt:
        return None
    digest = hashlib.blake2b(cache_salt, digest_size=HASH_SIZE, person=_ROOT_PERSON).digest()
    return _ROOT_TAG + digest


def is_chain_root(parent: bytes | None) -> bool:
    """Whether a block whose parent hash is ``parent`` is the first block of its chain."""
    return parent is None or (len(parent) == len(_ROOT_TAG) + HASH_SIZE
                              and parent.startswith(_ROOT_TAG))
