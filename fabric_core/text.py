"""Text the contract accepts: what every string must be, and what a name must be.

Every string a client sends (a name, a hostname, a token, a log message, a fact test, a content path)
must be storable and encodable on every backend: no NUL (PostgreSQL's text cannot hold it) and no lone
surrogate (`"\\ud800"` is valid JSON, but no UTF-8 encoder, hence no database driver, canonical JSON or
HTTP answer, can write it). Names (groups, locations, policies, hostnames) are more: they are shown to
operators and compared for uniqueness, so they are normalised to Unicode NFC (the composed `é` and `e`
with a combining accent are one name) and may not hold control characters (category Cc: newlines, tabs,
escape sequences that would forge lines in a log or a terminal).

`check_text` and `normalise_name` raise `ValueError`, which pydantic turns into a 422 with the reason;
`Text` is the annotated type for model fields, `name_rule(n)` the validator of a name field (after its
length and whitespace constraints).
"""

from __future__ import annotations

import unicodedata
from typing import Annotated

from pydantic import AfterValidator


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as text, or None if it can."""
    if "\x00" in value:
        return "NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "lone surrogates (U+D800 to U+DFFF)"
    return None


def check_text(value: str) -> str:
    """`value`, if it can be stored as text; `ValueError` saying why not otherwise."""
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(f"may not contain {problem}")
    return value


def control_character(value: str) -> str | None:
    """The first control character (or lone surrogate) of `value`, as `U+XXXX`, or None."""
    for char in value:
        if unicodedata.category(char) in ("Cc", "Cs"):
            return f"U+{ord(char):04X}"
    return None


def normalise_name(value: str, max_length: int | None = None) -> str:
    """`value` in NFC; `ValueError` if it holds a control character or a lone surrogate, or if NFC made
    it longer than `max_length` (a few characters decompose under NFC)."""
    found = control_character(value)
    if found is not None:
        raise ValueError(f"may not contain control characters or lone surrogates (found {found})")
    normal = unicodedata.normalize("NFC", value)
    if max_length is not None and len(normal) > max_length:
        raise ValueError(f"is longer than {max_length} characters in Unicode NFC")
    return normal


def name_rule(max_length: int) -> AfterValidator:
    """The validator of a name field of at most `max_length` characters (after its own constraints)."""
    return AfterValidator(lambda value: normalise_name(value, max_length))


def name_key(value: str) -> str:
    """What two names are compared by when case does not count: NFC of the case-folded NFC form."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", value).casefold())


Text = Annotated[str, AfterValidator(check_text)]
"""A string that can be stored: no NUL, no lone surrogate."""
