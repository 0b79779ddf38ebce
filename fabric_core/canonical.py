"""Canonical JSON: the one byte form of a document that is hashed and signed.

orjson with sorted keys, no whitespace, UTF-8. Two documents are the same exactly when their canonical
bytes are; that is how the manager decides whether a change is real and deserves a new serial.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def canonical_json(value: Any) -> bytes:
    """The canonical bytes of a JSON-compatible value."""
    return orjson.dumps(value, option=_OPTIONS)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
