"""Noticing that files a running service read at start have changed on disk, so a rotated
certificate or an edited API key file takes effect without a restart.

Kubernetes updates a mounted Secret or ConfigMap in place (an atomic swap of the files behind a
symlink, within about a minute of the change); an operator may edit a file directly. Both change
a file's inode, size or mtime, which is all ``FileWatch`` compares: three ``stat`` calls, at most
once every ``CHECK_INTERVAL_S``, however often a caller asks (at every handshake, at every call).
A swap by rename (Kubernetes', cert-manager's, ``mv``) always shows as a new inode; an in-place
rewrite to the same size within one tick of the file system's clock as the previous write does
not, until the next change.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

# How often at most a service looks at the files it watches.
CHECK_INTERVAL_S = 1.0

Stamp = tuple[tuple[int, int, int], ...] | None  # None: a file is missing


class FileWatch:
    """``changed()`` is True once for each change of ``paths`` since the last look (a file
    that goes missing is a change; so is its return). Not thread-safe: callers lock."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self._stamp = self.stamp()
        self._checked = time.monotonic()

    def stamp(self) -> Stamp:
        try:
            return tuple((st.st_ino, st.st_size, st.st_mtime_ns)
                         for st in (os.stat(p) for p in self.paths))
        except OSError:
            return None

    def changed(self) -> bool:
        now = time.monotonic()
        if now - self._checked < CHECK_INTERVAL_S:
            return False
        self._checked = now
        stamp = self.stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True
