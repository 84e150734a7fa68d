"""Reads the key/value metadata of a GGUF file, and nothing else.

The router needs only the tokenizer keys, so this stops before the tensor infos. ``gguf.GGUFReader``
would also work but builds a Python object per array element and per tensor (seconds for a 49k
vocabulary); this reads numeric arrays with numpy and strings with one slice each.

Layout (little-endian, GGUF v2/v3)::

    "GGUF" | u32 version | u64 n_tensors | u64 n_kv | n_kv x (string key, u32 type, value) | ...
    string = u64 length + UTF-8 bytes;  array = u32 item type + u64 count + items
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

_SCALARS: dict[int, str] = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
    10: "<u8", 11: "<i8", 12: "<f8",
}
_STRING = 8
_ARRAY = 9
_BOOL = 7


class _Cursor:
    """A read position over a buffer; every read advances it."""

    def __init__(self, buf: Any) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def array(self, item_type: int, count: int) -> Any:
        if item_type == _STRING:
            return [self.string() for _ in range(count)]
        if item_type == _ARRAY:
            return [self.value(_ARRAY) for _ in range(count)]
        dtype = np.dtype(_SCALARS[item_type])
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += dtype.itemsize * count
        return values.astype(bool).tolist() if item_type == _BOOL else values.tolist()

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type = self.unpack("<I")
            return self.array(item_type, self.unpack("<Q"))
        value = np.frombuffer(self.buf, dtype=_SCALARS[value_type], count=1, offset=self.pos)
        self.pos += value.itemsize
        return bool(value[0]) if value_type == _BOOL else value[0].item()


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Returns every metadata key of the GGUF file at ``path`` (arrays as Python lists).

    Raises ``ValueError`` if the file is not GGUF v2 or v3."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cursor = _Cursor(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        cursor.pos = 4
        version = cursor.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
        cursor.unpack("<Q")  # tensor count
        num_kv = cursor.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.unpack("<I"))
        del cursor  # release the exported mmap pointer before the mmap closes
        return metadata
