"""fabric_core.patterns: fact condition patterns are RE2, so an agent never runs an unbounded match."""

from __future__ import annotations

import re
import time

import pytest

from fabric_core.patterns import MAX_PATTERN_LENGTH, PatternError, compile_pattern, fullmatch


def test_a_pattern_that_backtracks_in_python_runs_in_linear_time():
    text = "a" * 200_000 + "b"
    started = time.perf_counter()
    assert not fullmatch("(a+)+$", text)
    assert not fullmatch("(a|aa)*c", text)
    assert time.perf_counter() - started < 0.5


def test_python_re_really_backtracks_on_it():
    """The reason for RE2: Python's engine doubles its time with every character (kept short here)."""
    started = time.perf_counter()
    assert re.fullmatch("(a+)+$", "a" * 18 + "b") is None
    assert time.perf_counter() - started > 0.001


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        (r"lab-pc-\d+", "lab-pc-12", True),
        ("lab", "lab-pc-12", False),  # the whole value, not a search
        ("(?i)LAB.*", "lab-1", True),
        (r"\p{Greek}+", "αβγ", True),
        ("é+", "éé", True),
    ],
)
def test_fullmatch(pattern, text, expected):
    assert fullmatch(pattern, text) is expected


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", "invalid escape"),
        ("(?=a)", "perl operator"),
        ("(?<!a)b", "perl operator"),
        ("(", r"missing \)"),
        ("x{1001}", "repetition"),
        ("a" * (MAX_PATTERN_LENGTH + 1), "longer than"),
        ("\ud800", "surrogate"),
    ],
)
def test_a_pattern_re2_cannot_compile_is_refused_saying_why(pattern, reason):
    with pytest.raises(PatternError, match=reason):
        compile_pattern(pattern)


def test_the_error_is_a_value_error_and_names_re2():
    with pytest.raises(ValueError, match="RE2"):
        compile_pattern(r"(a)\1")


def test_text_re2_cannot_read_matches_nothing():
    assert fullmatch(".*", "\ud800") is False
