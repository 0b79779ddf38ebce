"""Canonical JSON: one byte form per document, hashed and signed."""

from __future__ import annotations

import hashlib
import json

import orjson
import pytest

from fabric_core.canonical import (
    MAX_JSON_DEPTH,
    PLAIN_JSON,
    canonical_json,
    is_plain_json,
    json_depth,
    sha256_hex,
)


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


# --- how deep free JSON may nest ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "depth"), [(1, 0), ("s", 0), ({}, 1), ([], 1), ({"a": [1]}, 2), ([[[]]], 3)]
)
def test_json_depth_counts_objects_and_arrays(value, depth) -> None:
    assert json_depth(value) == depth


def test_json_depth_stops_counting_past_the_limit_without_recursing() -> None:
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert json_depth(deep, limit=40) == 41


def test_plain_json_nests_at_most_the_limit() -> None:
    assert is_plain_json({"ok": [{"x": 1}]})
    value: dict = {}
    for _ in range(MAX_JSON_DEPTH - 1):
        value = {"a": value}
    assert json_depth(value) == MAX_JSON_DEPTH and is_plain_json(value)
    assert not is_plain_json({"a": value})
    assert f"{MAX_JSON_DEPTH} deep" in PLAIN_JSON


def test_a_document_with_a_body_at_the_limit_is_far_from_canonical_jsons_own_limit() -> None:
    body: dict = {}
    for _ in range(MAX_JSON_DEPTH - 1):
        body = {"a": body}
    envelope = {"doc": {"policies": {"firewall": {"body": body}}}, "sig": "", "kid": ""}
    assert orjson.loads(canonical_json(envelope)) == envelope


@pytest.mark.parametrize("value", [{"x": float("nan")}, {"x": 2**64}, {"x": "\ud800"}, {"\ud800": 1}])
def test_plain_json_refuses_what_canonical_json_cannot_carry(value) -> None:
    assert not is_plain_json(value)
