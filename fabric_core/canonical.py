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


MAX_JSON_DEPTH = 32
"""How deeply free JSON (a policy body, facts, a status, log data) may nest: objects and arrays, counted
from the value itself (`{}` is 1 deep, `{"a": [1]}` 2). A document carries a policy body 4 levels
below its top (`doc.policies.<type>.body`) and the envelope one more, so documents stay far below
orjson's limit of 255 (past which canonical JSON cannot be written at all) and below the limits of the
JSON parsers other agents may use; configuration seldom needs more than a handful of levels."""

PLAIN_JSON = (
    f"plain JSON: no NaN or Infinity, no integers beyond 64 bits, no lone surrogates, "
    f"nested at most {MAX_JSON_DEPTH} deep"
)
"""What `is_plain_json` accepts, in the words of an error message."""


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply `value` nests (a scalar 0, `[]` 1, `{"a": [1]}` 2), without recursion; stops counting
    once past `limit`."""
    depth = 0
    level: list[Any] = [value]
    while True:
        containers = [item for item in level if isinstance(item, dict | list)]
        if not containers:
            return depth
        depth += 1
        if depth > limit:
            return depth
        level = [child for c in containers for child in (c.values() if isinstance(c, dict) else c)]


def is_plain_json(value: Any) -> bool:
    """True if `value` survives canonical JSON unchanged and nests at most `MAX_JSON_DEPTH` deep.

    Python's JSON parser takes NaN and Infinity, which orjson writes as null and PostgreSQL's json refuses;
    orjson refuses integers beyond 64 bits and lone surrogates. Any of these would break signing, storage
    or batched writes later; so would nesting too deep for canonical JSON.
    """
    if json_depth(value) > MAX_JSON_DEPTH:
        return False
    try:
        return bool(orjson.loads(canonical_json(value)) == value)
    except TypeError:
        return False
