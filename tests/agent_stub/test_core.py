"""AgentCore: only signed, well-formed documents for the agent's group that are no rollback are applied."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent_stub import core as agent_core
from agent_stub.core import AgentCore, Outcome
from agent_stub.errors import NotEnrolledError
from agent_stub.state import CURRENT_FILE, FileStateStore, MemoryStateStore
from fabric_core.signing import SigningKey
from tests.agent_stub.conftest import GROUP_ID, LOCATION_ID, make_doc


def _current(store: FileStateStore) -> bytes:
    return (store.state_dir / CURRENT_FILE).read_bytes()


@pytest.fixture
def core(file_store: FileStateStore) -> AgentCore:
    return AgentCore.from_store(file_store)


@pytest.fixture
def applied(core: AgentCore, signing_key: SigningKey) -> bytes:
    """The core holds serial 5; returns its envelope."""
    envelope = signing_key.sign_envelope(make_doc(serial=5))
    assert core.offer(envelope, "test").applied
    return envelope


def test_defaults_before_any_document(core: AgentCore) -> None:
    assert (core.serial, core.location_id, core.mode, core.heartbeat_s) == (0, None, "pull", 300)
    assert core.document is None


def test_not_enrolled_store_is_refused() -> None:
    with pytest.raises(NotEnrolledError):
        AgentCore.from_store(MemoryStateStore())


def test_applies_a_signed_newer_document(
    core: AgentCore, file_store: FileStateStore, signing_key: SigningKey
) -> None:
    envelope = signing_key.sign_envelope(make_doc(serial=5, mode="push", heartbeat_s=60))

    outcome = core.offer(envelope, "heartbeat")

    assert outcome.status is Outcome.APPLIED
    assert outcome.serial == 5 and outcome.source == "heartbeat"
    assert (core.serial, core.location_id, core.mode, core.heartbeat_s) == (5, LOCATION_ID, "push", 60)
    assert _current(file_store) == envelope
    status = file_store.load_status()
    assert status is not None and (status.serial, status.location_id, status.mode) == (5, LOCATION_ID, "push")


def test_applies_an_envelope_given_as_dict(core: AgentCore, signing_key: SigningKey) -> None:
    envelope = orjson.loads(signing_key.sign_envelope(make_doc(serial=2)))
    assert core.offer(envelope, "mqtt").applied
    assert core.serial == 2


def test_applied_document_survives_a_restart(
    applied: bytes, file_store: FileStateStore, signing_key: SigningKey
) -> None:
    again = AgentCore.from_store(file_store)
    assert (again.serial, again.location_id) == (5, LOCATION_ID)
    # ...and anti-rollback holds across the restart.
    assert again.offer(signing_key.sign_envelope(make_doc(serial=4)), "test").status is Outcome.STALE


@pytest.mark.parametrize("serial", [4, 5])
def test_older_or_equal_serial_is_stale(
    core: AgentCore, applied: bytes, file_store: FileStateStore, signing_key: SigningKey, serial: int
) -> None:
    outcome = core.offer(signing_key.sign_envelope(make_doc(serial=serial)), "test")

    assert outcome.status is Outcome.STALE and outcome.serial == serial
    assert (core.serial, core.location_id) == (5, LOCATION_ID)
    assert _current(file_store) == applied


def test_another_location_may_carry_a_lower_serial_but_never_goes_back_there(
    core: AgentCore, applied: bytes, signing_key: SigningKey
) -> None:
    other = LOCATION_ID + 1
    # The other location changed less recently than ours: its serial is lower, and still current.
    assert core.offer(signing_key.sign_envelope(make_doc(serial=3, location_id=other)), "mqtt").applied
    assert (core.serial, core.location_id) == (3, other)
    # Back to the first location: its document again (equal to what we held there) is no rollback...
    assert core.offer(signing_key.sign_envelope(make_doc(serial=5)), "mqtt").applied
    # ...but an older version of the other location's document is.
    outcome = core.offer(signing_key.sign_envelope(make_doc(serial=2, location_id=other)), "mqtt")
    assert outcome.status is Outcome.STALE
    assert core.location_id == LOCATION_ID


def test_a_move_to_another_group_is_taken_only_from_the_manager(
    core: AgentCore, applied: bytes, file_store: FileStateStore, signing_key: SigningKey
) -> None:
    moved = signing_key.sign_envelope(make_doc(serial=2, group_id=GROUP_ID + 1))
    assert core.offer(moved, "mqtt").status is Outcome.REJECTED
    assert core.identity.group_id == GROUP_ID

    assert core.offer(moved, "heartbeat").applied
    assert core.identity.group_id == GROUP_ID + 1
    stored = file_store.load_identity()
    assert stored is not None and stored.group_id == GROUP_ID + 1
    assert AgentCore.from_store(file_store).serial == 2  # the new group's document verifies on restart


def _tampered(key: SigningKey) -> bytes:
    envelope = orjson.loads(key.sign_envelope(make_doc(serial=9)))
    envelope["doc"]["policies"]["firewall"]["body"]["rules"][0]["allow"] = "any"
    return orjson.dumps(envelope)


def _flipped_byte(key: SigningKey) -> bytes:
    raw = bytearray(key.sign_envelope(make_doc(serial=9)))
    at = raw.index(b"tcp/443")
    raw[at] = ord("u")  # "ucp/443": still valid JSON, different document bytes
    return bytes(raw)


def _unsigned(key: SigningKey) -> dict[str, Any]:
    return {"doc": make_doc(serial=9)}


def _bad_sig_encoding(key: SigningKey) -> bytes:
    envelope = orjson.loads(key.sign_envelope(make_doc(serial=9)))
    envelope["sig"] = "not base64!"
    return orjson.dumps(envelope)


def _zero_sig(key: SigningKey) -> bytes:
    envelope = orjson.loads(key.sign_envelope(make_doc(serial=9)))
    envelope["sig"] = base64.b64encode(bytes(64)).decode()
    return orjson.dumps(envelope)


def _other_key(key: SigningKey) -> bytes:
    return SigningKey.generate().sign_envelope(make_doc(serial=9))


def _other_key_same_kid(key: SigningKey) -> bytes:
    # Claims the pinned kid, but is signed by someone else.
    envelope = orjson.loads(SigningKey.generate().sign_envelope(make_doc(serial=9)))
    envelope["kid"] = key.verify_key.kid
    return orjson.dumps(envelope)


def _malformed_doc(key: SigningKey) -> bytes:
    doc = make_doc(serial=9)
    del doc["communication"]
    return key.sign_envelope(doc)


def _bad_serial(key: SigningKey) -> bytes:
    doc = make_doc(serial=9)
    doc["serial"] = "nine"
    return key.sign_envelope(doc)


def _other_group(key: SigningKey) -> bytes:
    return key.sign_envelope(make_doc(serial=9, group_id=GROUP_ID + 1))


def _deep(key: SigningKey) -> dict[str, Any]:
    doc: dict[str, Any] = make_doc(serial=9)
    inner = doc
    for _ in range(300):
        inner["nested"] = {}
        inner = inner["nested"]
    return {"doc": doc, "sig": "AA==", "kid": key.verify_key.kid}


REJECTED = {
    "tampered doc": _tampered,
    "flipped byte": _flipped_byte,
    "unsigned": _unsigned,
    "signature not base64": _bad_sig_encoding,
    "wrong signature": _zero_sig,
    "other key": _other_key,
    "other key, pinned kid": _other_key_same_kid,
    "malformed document": _malformed_doc,
    "serial not an int": _bad_serial,
    "other group": _other_group,
    "not json": lambda key: b"{not json",
    "json array": lambda key: b"[1, 2]",
    "empty": lambda key: b"",
    "int beyond 64 bits": lambda key: {"doc": {"serial": 2**70}, "sig": "AA==", "kid": key.verify_key.kid},
    "nested too deep": _deep,
    "extra envelope key": lambda key: {**orjson.loads(key.sign_envelope(make_doc(serial=9))), "x": 1},
}


@pytest.mark.parametrize("build", REJECTED.values(), ids=list(REJECTED))
def test_bad_input_is_rejected_and_changes_nothing(
    core: AgentCore,
    applied: bytes,
    file_store: FileStateStore,
    signing_key: SigningKey,
    build: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="agent_stub.core"):
        outcome = core.offer(build(signing_key), "test")

    assert outcome.status is Outcome.REJECTED
    assert outcome.reason
    assert not outcome.applied
    assert core.serial == 5
    assert _current(file_store) == applied
    assert any("rejected" in record.getMessage() for record in caplog.records)


def test_rejects_before_any_document_too(
    core: AgentCore, file_store: FileStateStore, signing_key: SigningKey
) -> None:
    outcome = core.offer(_other_group(signing_key), "test")
    assert outcome.status is Outcome.REJECTED
    assert core.serial == 0
    assert not (file_store.state_dir / CURRENT_FILE).exists()


def test_store_failure_is_not_applied(
    core: AgentCore, applied: bytes, signing_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(envelope: bytes) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(FileStateStore, "save_current", lambda self, envelope: broken(envelope))
    outcome = core.offer(signing_key.sign_envelope(make_doc(serial=6)), "test")

    assert outcome.status is Outcome.REJECTED and "disk full" in (outcome.reason or "")
    assert core.serial == 5


def test_stored_document_from_another_key_is_ignored_on_load(
    file_store: FileStateStore, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file_store.save_current(SigningKey.generate().sign_envelope(make_doc(serial=5)))
    with caplog.at_level(logging.WARNING):
        core = AgentCore.from_store(file_store)
    assert core.serial == 0
    assert "ignoring the stored document" in caplog.text


def test_memory_store_works_the_same(identity: Any, signing_key: SigningKey) -> None:
    store = MemoryStateStore(identity)
    core = AgentCore.from_store(store)
    envelope = signing_key.sign_envelope(make_doc(serial=3))

    assert core.offer(envelope, "sim").applied
    assert store.current == envelope
    assert AgentCore.from_store(store).serial == 3


# --- what transports rely on -------------------------------------------------------------------------


def test_listeners_hear_of_applied_documents_only(
    core: AgentCore, signing_key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[int] = []
    remove = core.add_listener(lambda doc: heard.append(doc.serial))

    def broken(doc: Any) -> None:
        raise RuntimeError("transport bug")

    core.add_listener(broken)
    with caplog.at_level(logging.ERROR, logger="agent_stub.core"):
        assert core.offer(signing_key.sign_envelope(make_doc(serial=2)), "test").applied
    assert "a listener failed on serial 2" in caplog.text
    core.offer(signing_key.sign_envelope(make_doc(serial=2)), "test")  # stale
    core.offer(SigningKey.generate().sign_envelope(make_doc(serial=3)), "test")  # rejected
    remove()
    core.offer(signing_key.sign_envelope(make_doc(serial=4)), "test")
    assert heard == [2]
    assert core.serial == 4


def test_expect_rejects_a_document_of_another_group_or_location(
    core: AgentCore, signing_key: SigningKey
) -> None:
    envelope = signing_key.sign_envelope(make_doc(serial=2, location_id=LOCATION_ID + 1))
    outcome = core.offer(envelope, "mqtt", expect=(GROUP_ID, LOCATION_ID))
    assert outcome.status is Outcome.REJECTED and "expected (group 3, location 7)" in (outcome.reason or "")
    assert core.offer(envelope, "mqtt", expect=(GROUP_ID, LOCATION_ID + 1)).applied


def test_the_transport_is_kept_in_the_status(core: AgentCore, file_store: FileStateStore) -> None:
    assert core.transport == "pull" and core.status.transport is None
    core.transport = "push"
    assert file_store.load_status().transport == "push"  # type: ignore[union-attr]
    core.transport = "pull"
    assert file_store.load_status().transport == "pull"  # type: ignore[union-attr]
    core.record_stopped()
    assert core.transport == "pull" and file_store.load_status().transport is None  # type: ignore[union-attr]


def test_the_bytes_held_again_are_stale_without_a_second_signature_check(
    core: AgentCore, applied: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retained copy on re-subscribing, a republish after a broker restart: the same bytes."""
    checks: list[object] = []
    real = agent_core.open_envelope
    monkeypatch.setattr(agent_core, "open_envelope", lambda *a: checks.append(a) or real(*a))

    outcome = core.offer(applied, "mqtt", expect=(GROUP_ID, LOCATION_ID))

    assert outcome.status is Outcome.STALE and outcome.serial == 5
    assert checks == []
    # Anything else is checked as ever: one byte more (JSON whitespace) is another envelope.
    assert core.offer(applied + b" ", "mqtt").status is Outcome.STALE
    assert len(checks) == 1
    # And a copy for another (group, location) than the topic says is refused, held bytes or not.
    assert core.offer(applied, "mqtt", expect=(GROUP_ID, LOCATION_ID + 1)).status is Outcome.REJECTED


def test_the_bytes_held_are_remembered_across_a_restart(
    applied: bytes, file_store: FileStateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    restarted = AgentCore.from_store(file_store)  # verified once, on load
    monkeypatch.setattr(agent_core, "open_envelope", lambda *a: pytest.fail("verified twice"))
    assert restarted.offer(applied, "mqtt").status is Outcome.STALE
