"""The one check of a request id, wherever one arrives from outside (router, scheduler Submit).

A request id goes on every log line of its request, so it may not contain control or line-break
characters: a newline in it would forge log lines."""

from __future__ import annotations

import unicodedata

from pagedserve.core.errors import InvalidArgument

MAX_REQUEST_ID_CHARS = 128

# Control characters, and the Unicode line and paragraph separators (U+2028, U+2029).
_UNPRINTABLE = frozenset({"Cc", "Zl", "Zp"})


def check_request_id(request_id: str) -> None:
    """Raises ``InvalidArgument`` (field ``request_id``) for one that is too long or holds a
    control or line-break character. An empty id passes (the router makes one)."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")
    if any(unicodedata.category(c) in _UNPRINTABLE for c in request_id):
        raise InvalidArgument("request_id", "must not contain control or line-break characters")
