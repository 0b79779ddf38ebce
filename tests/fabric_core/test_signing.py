"""Ed25519 envelopes: sign_envelope, open_envelope, VerifyKey and SigningKey."""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fabric_core import signing
from fabric_core.canonical import canonical_json
from fabric_core.errors import (
    BadSignature,
    ContractError,
    InvalidDocument,
    SignatureError,
    UnknownSigningKey,
)
from fabric_core.signing import SigningKey, VerifyKey, key_id, open_envelope

B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

DOC: dict[str, Any] = {
    "serial": 42,
    "group_id": 3,
    "location_id": 7,
    "issued_at": "2024-05-01T12:00:00Z",
    "communication": {"mode": "push", "heartbeat_s": 300, "download_enabled": True, "randomize_s": 0},
    "locations": [{"id": 7, "name": "Default", "is_default": True, "conditions": []}],
    "policies": {
        "firewall": {
            "id": 1,
            "name": "fw",
            "version": 2,
            "source_group_id": 1,
            "scope": "group",
            "body": {"rules": [{"port": 22, "allow": False}], "note": "café ✓"},
        }
    },
    "content": {"av": {"revision": 5, "manifest_sha256": "ab" * 32}},
}


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def envelope(key: SigningKey) -> dict[str, Any]:
    return orjson.loads(key.sign_envelope(DOC))


def _raw_public(key: SigningKey) -> bytes:
    return key.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# --- round trip and shape ----------------------------------------------------------------------------


def test_sign_then_open_returns_the_document(key: SigningKey) -> None:
    assert open_envelope(key.sign_envelope(DOC), key.verify_key) == DOC


@pytest.mark.parametrize(
    "doc",
    [{}, {"a": 1}, {"nested": {"b": [1, 2, {"c": None}]}}, {"unicode": "日本語 🎉"}, DOC],
)
def test_round_trip_for_various_documents(key: SigningKey, doc: dict[str, Any]) -> None:
    assert open_envelope(key.sign_envelope(doc), key.verify_key) == doc


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda data: data, id="bytes"),
        pytest.param(lambda data: data.decode("utf-8"), id="str"),
        pytest.param(orjson.loads, id="dict"),
    ],
)
def test_open_envelope_accepts_bytes_str_and_dict(key: SigningKey, convert: Callable[[bytes], Any]) -> None:
    assert open_envelope(convert(key.sign_envelope(DOC)), key.verify_key) == DOC


def test_envelope_bytes_are_canonical_json_with_exactly_doc_sig_kid(key: SigningKey) -> None:
    data = key.sign_envelope(DOC)
    parsed = orjson.loads(data)
    assert set(parsed) == {"doc", "sig", "kid"}
    assert data == canonical_json(parsed)
    assert parsed["doc"] == DOC
    assert parsed["kid"] == key.verify_key.kid


def test_signature_is_base64_of_ed25519_over_canonical_doc(key: SigningKey) -> None:
    parsed = orjson.loads(key.sign_envelope(DOC))
    signature = base64.b64decode(parsed["sig"], validate=True)
    assert len(signature) == 64
    key.private.public_key().verify(signature, orjson.dumps(DOC, option=orjson.OPT_SORT_KEYS))


def test_key_order_of_doc_does_not_change_the_envelope(key: SigningKey) -> None:
    reordered = dict(reversed(list(DOC.items())))
    assert key.sign_envelope(reordered) == key.sign_envelope(DOC)


def test_kid_is_derived_from_the_public_key(key: SigningKey) -> None:
    raw = _raw_public(key)
    assert key.verify_key.kid == key_id(raw)
    assert key_id(raw) == "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
    assert key.verify_key.public_base64 == base64.b64encode(raw).decode()


def test_distinct_keys_have_distinct_kids(key: SigningKey, other_key: SigningKey) -> None:
    assert key.verify_key.kid != other_key.verify_key.kid


# --- tampering ---------------------------------------------------------------------------------------


def _change_value(doc: dict[str, Any]) -> None:
    doc["serial"] = 43


def _change_string(doc: dict[str, Any]) -> None:
    doc["issued_at"] = "2024-05-01T12:00:01Z"


def _add_key(doc: dict[str, Any]) -> None:
    doc["extra"] = True


def _add_null_key(doc: dict[str, Any]) -> None:
    doc["extra"] = None


def _remove_key(doc: dict[str, Any]) -> None:
    del doc["content"]


def _nested_change(doc: dict[str, Any]) -> None:
    doc["policies"]["firewall"]["body"]["rules"][0]["allow"] = True


def _nested_add(doc: dict[str, Any]) -> None:
    doc["communication"]["jitter"] = 1


def _nested_remove(doc: dict[str, Any]) -> None:
    del doc["communication"]["randomize_s"]


def _list_reorder(doc: dict[str, Any]) -> None:
    doc["locations"].append({"id": 8, "name": "Office", "is_default": False, "conditions": []})


def _type_change(doc: dict[str, Any]) -> None:
    doc["serial"] = "42"


def _unicode_change(doc: dict[str, Any]) -> None:
    doc["policies"]["firewall"]["body"]["note"] = "cafe ✓"


@pytest.mark.parametrize(
    "tamper",
    [
        _change_value,
        _change_string,
        _add_key,
        _add_null_key,
        _remove_key,
        _nested_change,
        _nested_add,
        _nested_remove,
        _list_reorder,
        _type_change,
        _unicode_change,
    ],
)
def test_tampered_doc_is_a_bad_signature(
    envelope: dict[str, Any], key: SigningKey, tamper: Callable[[dict[str, Any]], None]
) -> None:
    tampered = copy.deepcopy(envelope)
    tamper(tampered["doc"])
    with pytest.raises(BadSignature):
        open_envelope(tampered, key.verify_key)
    with pytest.raises(BadSignature):
        open_envelope(canonical_json(tampered), key.verify_key)


def _tampered_signatures(sig: str) -> list[str]:
    """Every one-character substitution of `sig` that changes the decoded signature bytes."""
    original = base64.b64decode(sig)
    out = []
    for index, char in enumerate(sig):
        if char == "=":
            continue
        for replacement in B64_ALPHABET:
            if replacement == char:
                continue
            candidate = sig[:index] + replacement + sig[index + 1 :]
            if base64.b64decode(candidate) != original:
                out.append(candidate)
                break
    return out


def test_tampering_any_character_of_sig_is_a_bad_signature(envelope: dict[str, Any], key: SigningKey) -> None:
    candidates = _tampered_signatures(envelope["sig"])
    assert len(candidates) == len(envelope["sig"].rstrip("="))
    for candidate in candidates:
        with pytest.raises(BadSignature):
            open_envelope({**envelope, "sig": candidate}, key.verify_key)


def test_non_canonical_base64_sig_is_rejected(envelope: dict[str, Any], key: SigningKey) -> None:
    sig = envelope["sig"]
    assert sig.endswith("==")
    last = B64_ALPHABET.index(sig[-3])
    altered = sig[:-3] + B64_ALPHABET[last ^ 0b0001] + "=="
    assert altered != sig
    with pytest.raises(BadSignature):
        open_envelope({**envelope, "sig": altered}, key.verify_key)


@pytest.mark.parametrize(
    "kid",
    ["", "ed25519:0000000000000000", "ed25519:", "rsa:abcdef", "ED25519:UPPER"],
)
def test_changed_kid_is_an_unknown_signing_key(envelope: dict[str, Any], key: SigningKey, kid: str) -> None:
    with pytest.raises(UnknownSigningKey):
        open_envelope({**envelope, "kid": kid}, key.verify_key)


def test_changed_kid_one_char_is_an_unknown_signing_key(envelope: dict[str, Any], key: SigningKey) -> None:
    kid = envelope["kid"]
    altered = kid[:-1] + ("0" if kid[-1] != "0" else "1")
    with pytest.raises(UnknownSigningKey):
        open_envelope({**envelope, "kid": altered}, key.verify_key)


def test_doc_signed_by_another_key_is_an_unknown_signing_key(key: SigningKey, other_key: SigningKey) -> None:
    with pytest.raises(UnknownSigningKey):
        open_envelope(other_key.sign_envelope(DOC), key.verify_key)


def test_other_key_relabelled_with_the_pinned_kid_is_a_bad_signature(
    key: SigningKey, other_key: SigningKey
) -> None:
    forged = orjson.loads(other_key.sign_envelope(DOC))
    forged["kid"] = key.verify_key.kid
    with pytest.raises(BadSignature):
        open_envelope(forged, key.verify_key)


def test_verify_key_with_forged_kid_is_a_bad_signature(key: SigningKey, other_key: SigningKey) -> None:
    forged_pin = VerifyKey(other_key.verify_key.kid, key.private.public_key())
    with pytest.raises(BadSignature):
        open_envelope(other_key.sign_envelope(DOC), forged_pin)


def test_signature_of_another_document_is_a_bad_signature(key: SigningKey) -> None:
    first = orjson.loads(key.sign_envelope({"serial": 1}))
    second = orjson.loads(key.sign_envelope({"serial": 2}))
    with pytest.raises(BadSignature):
        open_envelope({**first, "sig": second["sig"]}, key.verify_key)


# --- malformed payloads ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"{",
        b'{"doc": {}, "sig": "x", "kid": "y"',
        b"\xff\xfe\x00",
        "",
        "{'doc': {}}",
        "NaN",
    ],
)
def test_non_json_payload_is_an_invalid_document(key: SigningKey, payload: bytes | str) -> None:
    with pytest.raises(InvalidDocument):
        open_envelope(payload, key.verify_key)


@pytest.mark.parametrize(
    "payload",
    [b"[]", b'[{"doc": {}, "sig": "", "kid": ""}]', b"null", b"1", b'"string"', b"true"],
)
def test_json_that_is_not_an_object_is_an_invalid_document(key: SigningKey, payload: bytes) -> None:
    with pytest.raises(InvalidDocument):
        open_envelope(payload, key.verify_key)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda env: env.pop("doc"), id="missing-doc"),
        pytest.param(lambda env: env.pop("sig"), id="missing-sig"),
        pytest.param(lambda env: env.pop("kid"), id="missing-kid"),
        pytest.param(lambda env: env.update(extra=1), id="extra-key"),
        pytest.param(lambda env: env.update(alg="none"), id="extra-alg"),
        pytest.param(lambda env: env.clear(), id="empty-object"),
    ],
)
def test_missing_or_extra_envelope_keys_are_an_invalid_document(
    envelope: dict[str, Any], key: SigningKey, mutate: Callable[[dict[str, Any]], None]
) -> None:
    mutate(envelope)
    with pytest.raises(InvalidDocument):
        open_envelope(envelope, key.verify_key)
    with pytest.raises(InvalidDocument):
        open_envelope(orjson.dumps(envelope), key.verify_key)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sig", None),
        ("sig", 123),
        ("sig", ["abc"]),
        ("sig", {"b64": "abc"}),
        ("sig", True),
        ("kid", None),
        ("kid", 1),
        ("doc", None),
        ("doc", []),
        ("doc", "{}"),
        ("doc", 5),
    ],
)
def test_wrongly_typed_envelope_fields_are_an_invalid_document(
    envelope: dict[str, Any], key: SigningKey, field: str, value: object
) -> None:
    envelope[field] = value
    with pytest.raises(InvalidDocument):
        open_envelope(envelope, key.verify_key)
    with pytest.raises(InvalidDocument):
        open_envelope(orjson.dumps(envelope), key.verify_key)


@pytest.mark.parametrize(
    "sig",
    ["", "not base64!", "****", "abc", "YWJj\n", " YWJj", "YW=Jj", "A", "AAAA", "AAAA" * 40],
)
def test_non_base64_or_wrong_length_sig_is_a_bad_signature(
    envelope: dict[str, Any], key: SigningKey, sig: str
) -> None:
    with pytest.raises(BadSignature):
        open_envelope({**envelope, "sig": sig}, key.verify_key)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"[]",
        b"{}",
        b'{"doc":{},"sig":"","kid":""}',
        b'{"doc":{},"sig":"%%%","kid":"KID"}',
        b'{"doc":[],"sig":"","kid":"KID"}',
        b'{"doc":{},"sig":1,"kid":"KID"}',
        b'{"doc":{},"sig":"","kid":"KID"}',
        b'{"doc":{},"sig":"AAAA","kid":"KID"}',
    ],
)
def test_malformed_payloads_only_raise_contract_or_signature_errors(key: SigningKey, payload: bytes) -> None:
    payload = payload.replace(b"KID", key.verify_key.kid.encode())
    with pytest.raises((InvalidDocument, SignatureError)) as info:
        open_envelope(payload, key.verify_key)
    assert isinstance(info.value, ContractError | SignatureError)


# --- VerifyKey ---------------------------------------------------------------------------------------


def test_verify_key_from_base64_round_trips(key: SigningKey) -> None:
    pinned = VerifyKey.from_base64(key.verify_key.kid, key.verify_key.public_base64)
    assert pinned.kid == key.verify_key.kid
    assert pinned.public_base64 == key.verify_key.public_base64
    assert open_envelope(key.sign_envelope(DOC), pinned) == DOC


@pytest.mark.parametrize("public_key", ["not base64!", "****", "abc", "YWJj\n", " " + "A" * 44])
def test_verify_key_rejects_bad_base64(key: SigningKey, public_key: str) -> None:
    with pytest.raises(InvalidDocument):
        VerifyKey.from_base64(key.verify_key.kid, public_key)


@pytest.mark.parametrize("length", [0, 1, 16, 31, 33, 64])
def test_verify_key_rejects_wrong_length(length: int) -> None:
    raw = bytes(range(length))
    with pytest.raises(InvalidDocument):
        VerifyKey.from_base64(key_id(raw), base64.b64encode(raw).decode())


@pytest.mark.parametrize(
    "kid_of",
    [
        pytest.param(lambda mine, other: other, id="other-key-kid"),
        pytest.param(lambda mine, other: "", id="empty"),
        pytest.param(lambda mine, other: mine.upper(), id="upper-case"),
        pytest.param(lambda mine, other: mine + "0", id="suffix"),
        pytest.param(lambda mine, other: mine.removeprefix("ed25519:"), id="no-prefix"),
    ],
)
def test_verify_key_rejects_a_kid_that_does_not_match(
    key: SigningKey, other_key: SigningKey, kid_of: Callable[[str, str], str]
) -> None:
    kid = kid_of(key.verify_key.kid, other_key.verify_key.kid)
    with pytest.raises(InvalidDocument):
        VerifyKey.from_base64(kid, key.verify_key.public_base64)


# --- SigningKey --------------------------------------------------------------------------------------


def test_seed_round_trip_gives_the_same_key(key: SigningKey) -> None:
    again = SigningKey.from_seed_base64(key.seed_base64)
    assert again.verify_key.kid == key.verify_key.kid
    assert again.sign_envelope(DOC) == key.sign_envelope(DOC)


def test_from_seed_base64_matches_cryptography(key: SigningKey) -> None:
    seed = bytes(range(32))
    expected = (
        Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    loaded = SigningKey.from_seed_base64(base64.b64encode(seed).decode())
    assert loaded.verify_key.kid == key_id(expected)


@pytest.mark.parametrize("length", [0, 1, 16, 31, 33, 64])
def test_from_seed_base64_rejects_wrong_lengths(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SigningKey.from_seed_base64(base64.b64encode(bytes(length)).decode())


@pytest.mark.parametrize("seed", ["not base64!", "****", "abc"])
def test_from_seed_base64_rejects_non_base64(seed: str) -> None:
    with pytest.raises(ValueError):
        SigningKey.from_seed_base64(seed)


def test_load_or_create_creates_a_0600_file(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "signing_key"
    created = SigningKey.load_or_create(path)
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == created.seed_base64


def test_load_or_create_reuses_the_file(tmp_path: Path) -> None:
    path = tmp_path / "signing_key"
    first = SigningKey.load_or_create(path)
    content = path.read_bytes()
    second = SigningKey.load_or_create(path)
    assert second.verify_key.kid == first.verify_key.kid
    assert second.seed_base64 == first.seed_base64
    assert path.read_bytes() == content
    assert open_envelope(first.sign_envelope(DOC), second.verify_key) == DOC


def test_load_or_create_reads_an_existing_seed(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "signing_key"
    path.write_text(key.seed_base64 + "\n")
    assert SigningKey.load_or_create(path).verify_key.kid == key.verify_key.kid


def test_load_or_create_rejects_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "signing_key"
    path.write_text(base64.b64encode(bytes(16)).decode())
    with pytest.raises(ValueError):
        SigningKey.load_or_create(path)


def test_load_or_create_is_atomic_for_a_concurrent_starter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "signing_key"
    real_open = os.open
    seen: dict[str, Any] = {}

    def open_then_let_another_process_load(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(file, flags, *args, **kwargs)
        if Path(file) == path and flags & os.O_CREAT and "other" not in seen:
            seen["other"] = None
            try:
                seen["other"] = SigningKey.load_or_create(path)
            except ValueError as exc:
                seen["other"] = exc
        return fd

    monkeypatch.setattr(signing.os, "open", open_then_let_another_process_load)
    mine = SigningKey.load_or_create(path)
    monkeypatch.undo()
    other = seen.get("other")
    if "other" in seen:
        assert isinstance(other, SigningKey), f"concurrent starter failed: {other!r}"
        assert other.verify_key.kid == mine.verify_key.kid
    assert SigningKey.load_or_create(path).verify_key.kid == mine.verify_key.kid


def test_generated_keys_differ() -> None:
    assert SigningKey.generate().seed_base64 != SigningKey.generate().seed_base64
