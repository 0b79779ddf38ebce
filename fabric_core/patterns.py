"""Regular expressions of fact conditions: RE2, whose matching time is linear in the text's length.

A location condition may test a host fact against a regular expression (`FactCondition.matches`). The
pattern comes from an operator and runs on every agent at every evaluation, so it must not be able to
take exponential time: Python's `re` backtracks, and `(a+)+$` on 24 characters took half a second on an
agent, doubling with each character. RE2 (the `google-re2` package, module `re2`) never backtracks; in
exchange it has no back-references and no look-around, and its `\\d`, `\\w`, `\\s` and `\\b` are ASCII.

The manager validates a pattern with `compile_pattern` (a pattern RE2 refuses is a 422 saying why) and
the agent matches with `fullmatch`, so a pattern either runs in linear time or never reaches an agent.
"""

from __future__ import annotations

import functools
from typing import Protocol, cast

import re2

MAX_PATTERN_LENGTH = 1024
"""The longest pattern a condition may carry."""
MAX_PROGRAM_BYTES = 1 << 20
"""RE2's memory budget for one compiled pattern: `(x{1000}){1000}` is refused, not built."""

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the error comes back as the exception; RE2 would also print it to stderr
_OPTIONS.max_mem = MAX_PROGRAM_BYTES


class Pattern(Protocol):
    def fullmatch(self, text: str) -> object | None: ...


class PatternError(ValueError):
    """A pattern RE2 cannot compile (or one that is too long)."""


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Pattern:
    """The compiled pattern; `PatternError` saying why RE2 refuses it."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"the pattern is longer than {MAX_PATTERN_LENGTH} characters")
    try:
        return cast(Pattern, re2.compile(pattern, _OPTIONS))
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(
            f"not a regular expression RE2 accepts ({reason}); RE2 has no back-references or look-around"
        ) from exc
    except UnicodeEncodeError as exc:
        raise PatternError("the pattern holds a lone surrogate") from exc


def fullmatch(pattern: str, text: str) -> bool:
    """Whether the whole of `text` matches `pattern`; False for text RE2 cannot read (lone surrogates)."""
    try:
        return compile_pattern(pattern).fullmatch(text) is not None
    except UnicodeEncodeError:
        return False
