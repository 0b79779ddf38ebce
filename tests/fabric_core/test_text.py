"""fabric_core.text: what any string must be (no NUL, no lone surrogate) and what a name must be."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from fabric_core.text import Text, check_text, name_key, normalise_name, text_problem


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("plain", None),
        ("tab\tand\nnewline", None),
        ("é ü 漢字 🙂", None),
        ("a\x00b", "NUL"),
        ("\ud800", "surrogate"),
    ],
)
def test_text_problem_names_what_cannot_be_stored(value, problem):
    found = text_problem(value)
    assert (found is None) if problem is None else (problem in (found or ""))


def test_check_text_raises_a_value_error_saying_why():
    with pytest.raises(ValueError, match="NUL"):
        check_text("a\x00")
    assert check_text("fine") == "fine"


def test_text_in_a_model_refuses_nul_and_surrogates():
    class Model(BaseModel):
        text: Text

    for bad in ("a\x00", "x\udc00y"):
        with pytest.raises(ValidationError):
            Model(text=bad)
    assert Model(text="ok").text == "ok"


def test_names_are_nfc():
    assert normalise_name("Cafe\u0301") == "Caf\u00e9"
    assert normalise_name("\u212b") == "\u00c5"  # ANGSTROM SIGN: its NFC is the letter


@pytest.mark.parametrize("name", ["a\nb", "a\tb", "\x1b[2J", "a\x7f", "a\u0085", "a\ud800"])
def test_names_refuse_control_characters(name):
    with pytest.raises(ValueError, match="control characters"):
        normalise_name(name)


def test_a_name_that_nfc_makes_too_long_is_refused():
    with pytest.raises(ValueError, match="longer than 3"):
        normalise_name("\u0958" * 2, max_length=3)  # each decomposes into two code points under NFC


def test_name_key_ignores_case_and_normalisation():
    assert name_key("CAFE\u0301") == name_key("caf\u00e9")
    assert name_key("Straße") == name_key("STRASSE")
