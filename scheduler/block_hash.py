"""Content hashes of full KV blocks, stable across processes (they are stored in Redis).

``hash(block i) = H(hash(block i-1) || extra || token ids of block i)``: equal hashes mean equal
KV content *including everything before the block*, because a token's K/V depend on every earlier
token. ``extra`` separates models (and, later, LoRA adapters) sharing one index.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

NONE_HASH = b"\x00" * 16


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    h = hashlib.blake2b(parent or NONE_HASH, digest_size=16)
    h.update(extra)
    h.update(array("i", token_ids).tobytes())
    return h.digest()


def hash_full_blocks(
    token_ids: Sequence[int], block_size: int, extra: bytes = b"", start_parent: bytes | None = None
) -> list[bytes]:
    """Hashes of every full block of ``token_ids``, in order."""
    hashes: list[bytes] = []
    parent = start_parent
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra)
        hashes.append(parent)
    return hashes
