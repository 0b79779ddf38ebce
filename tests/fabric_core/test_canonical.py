"""Canonical JSON: one byte form per document, hashed and signed."""

from __future__ import annotations

import hashlib
import json

import orjson
import pytest

from fabric_core.canonical import canonical_json, sha256_hex


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        ({"z": None, "m": [1, 2], "a": "x"}, {"a": "x", "z": None, "m": [1, 2]}),
        ({"outer": {"y": 1, "x": {"q": 2, "p": 3}}}, {"outer": {"x": {"p": 3, "q": 2}, "y": 1}}),
        ({"list": [{"b": 1, "a": 2}]}, {"list": [{"a": 2, "b": 1}]}),
    ],
)
def test_key_order_does_not_change_the_bytes(left: dict, right: dict) -> None:
    assert canonical_json(left) == canonical_json(right)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"b": 1, "a": 2}, b'{"a":2,"b":1}'),
        ({"b": {"d": 1, "c": 2}, "a": []}, b'{"a":[],"b":{"c":2,"d":1}}'),
        ({"x": [{"z": 1, "y": {"k": True, "j": None}}]}, b'{"x":[{"y":{"j":null,"k":true},"z":1}]}'),
        ([3, 1, 2], b"[3,1,2]"),
        ("text", b'"text"'),
        (12, b"12"),
    ],
)
def test_keys_are_sorted_at_every_depth_and_lists_keep_their_order(value: object, expected: bytes) -> None:
    assert canonical_json(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        {"a": 1, "b": [1, 2, {"c": "d e"}]},
        {"message": "two words", "nested": {"k": "v"}},
        [{"a": 1}, {"b": 2}],
    ],
)
def test_no_whitespace_outside_strings(value: object) -> None:
    data = canonical_json(value)
    outside_strings = b"".join(data.split(b'"')[0::2])
    assert b" " not in outside_strings
    assert b"\n" not in data
    assert b"\t" not in data


@pytest.mark.parametrize("text", ["é", "naïve café", "✓ ok", "日本語", "emoji 🎉", "Ωmega"])
def test_unicode_is_kept_as_utf8_not_escaped(text: str) -> None:
    data = canonical_json({"name": text})
    assert data == b'{"name":"' + text.encode("utf-8") + b'"}'
    assert b"\\u" not in data


@pytest.mark.parametrize(
    "value",
    [{"a": 1}, {"serial": 7, "policies": {"fw": {"id": 1}}}, {"u": "é"}, {}],
)
def test_canonical_bytes_parse_back_to_the_same_value(value: dict) -> None:
    assert orjson.loads(canonical_json(value)) == value
    assert json.loads(canonical_json(value).decode("utf-8")) == value


def test_different_values_have_different_bytes() -> None:
    assert canonical_json({"a": 1}) != canonical_json({"a": 2})
    assert canonical_json({"a": 1}) != canonical_json({"a": 1, "b": None})


@pytest.mark.parametrize(
    "value",
    [{"b": 1, "a": 2}, {"nested": {"y": 1, "x": 2}}, {"u": "日本"}],
)
def test_sha256_hex_of_canonical_bytes(value: dict) -> None:
    data = canonical_json(value)
    digest = sha256_hex(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert len(digest) == 64
    assert digest == digest.lower()
    reordered = dict(reversed(list(value.items())))
    assert sha256_hex(canonical_json(reordered)) == digest


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
    ],
)
def test_sha256_hex_known_vectors(data: bytes, expected: str) -> None:
    assert sha256_hex(data) == expected
