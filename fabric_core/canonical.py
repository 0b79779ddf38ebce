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


PLAIN_JSON = "plain JSON: no NaN or Infinity, no integers beyond 64 bits"
"""What `is_plain_json` accepts, in the words of an error message."""


def is_plain_json(value: Any) -> bool:
    """True if `value` survives canonical JSON unchanged.

    Python's JSON parser takes NaN and Infinity, which orjson writes as null and PostgreSQL's json refuses;
    orjson refuses integers beyond 64 bits. Either would break signing, storage or batched writes later.
    """
    try:
        return bool(orjson.loads(canonical_json(value)) == value)
    except TypeError:
        return False
