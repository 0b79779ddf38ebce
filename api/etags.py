"""Conditional GETs: `If-None-Match` as RFC 9110 (section 13.1.2) says.

The agent API's documents, manifests and blobs carry strong ETags; a client may send any of them back,
as it received them or marked weak (`W/"..."`, as a proxy may), in a list, or `*`. If-None-Match uses
the weak comparison: two tags match when their opaque parts are the same, weak or not; `*` matches any
current representation (so a resource that exists answers 304).
"""

from __future__ import annotations

import re

_TAG = re.compile(r'(?:W/)?("[^"]*")')


def none_match(if_none_match: str | None, etag: str) -> bool:
    """True if the request's `If-None-Match` matches the current `etag` (answer 304 Not Modified)."""
    if if_none_match is None:
        return False
    if if_none_match.strip() == "*":
        return True
    current = _TAG.fullmatch(etag)
    opaque = current.group(1) if current else etag
    return any(match.group(1) == opaque for match in _TAG.finditer(if_none_match))
