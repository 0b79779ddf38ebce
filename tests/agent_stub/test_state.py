"""FileStateStore: private files, atomic replacement, tolerance of a corrupt document or status."""

from __future__ import annotations

import json
import logging
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent_stub.core import AgentCore
from agent_stub.errors import CorruptStateError
from agent_stub.state import (
    CURRENT_FILE,
    IDENTITY_FILE,
    STATUS_FILE,
    AgentStatus,
    FileStateStore,
    Identity,
    MemoryStateStore,
    StoredMqttCredentials,
)
from fabric_core.signing import SigningKey
from fabric_core.tls import ManagerCA
from fabric_core.wire import EnrollResponse, MqttCredentials, MqttDelivery
from tests.agent_stub.conftest import make_doc


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_all(store: FileStateStore, identity: Identity) -> None:
    store.save_identity(identity)
    store.save_current(b'{"doc": {}}')
    store.save_status(AgentStatus(serial=4, last_heartbeat_at=datetime.now(UTC)))


def test_files_are_private_and_no_temp_files_remain(state_dir: Path, identity: Identity) -> None:
    store = FileStateStore(state_dir)
    _write_all(store, identity)
    _write_all(store, identity)  # replacing existing files too

    assert _mode(state_dir) == 0o700
    assert sorted(p.name for p in state_dir.iterdir()) == [CURRENT_FILE, IDENTITY_FILE, STATUS_FILE]
    for name in (CURRENT_FILE, IDENTITY_FILE, STATUS_FILE):
        assert _mode(state_dir / name) == 0o600, name


def test_existing_open_directory_is_tightened(state_dir: Path, identity: Identity) -> None:
    state_dir.mkdir(mode=0o755)
    os.chmod(state_dir, 0o755)
    FileStateStore(state_dir).save_identity(identity)
    assert _mode(state_dir) == 0o700


def test_round_trip(state_dir: Path, identity: Identity) -> None:
    store = FileStateStore(state_dir)
    status = AgentStatus(serial=4, location_id=2, mode="push", last_error="boom")
    store.save_identity(identity)
    store.save_current(b"envelope")
    store.save_status(status)

    again = FileStateStore(state_dir)
    assert again.load_identity() == identity
    assert again.load_current() == b"envelope"
    assert again.load_status() == status


def test_nothing_stored_reads_as_none_without_creating_the_directory(state_dir: Path) -> None:
    store = FileStateStore(state_dir)
    assert (store.load_identity(), store.load_current(), store.load_status()) == (None, None, None)
    assert not state_dir.exists()


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStateStore(state_dir)
    store.save_current(b"old")

    def crash(src: str, dst: object) -> None:
        raise OSError("crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="crash before rename"):
        store.save_current(b"new")

    assert store.load_current() == b"old"
    assert [p.name for p in state_dir.iterdir()] == [CURRENT_FILE]


def test_write_goes_through_a_temp_file_in_the_same_directory(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStateStore(state_dir)
    store.save_current(b"old")
    seen: list[tuple[Path, bytes, bytes]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        # At the moment of the swap the target still holds the old bytes, the temp file the new ones.
        seen.append((Path(src), Path(src).read_bytes(), Path(dst).read_bytes()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    store.save_current(b"new")

    [(tmp, new, old)] = seen
    assert tmp.parent == state_dir and tmp.name != CURRENT_FILE
    assert (new, old) == (b"new", b"old")
    assert store.load_current() == b"new"


def test_reset_forgets_document_and_status_but_keeps_identity(state_dir: Path, identity: Identity) -> None:
    store = FileStateStore(state_dir)
    _write_all(store, identity)
    store.reset()
    assert (store.load_current(), store.load_status()) == (None, None)
    assert store.load_identity() == identity


@pytest.mark.parametrize("garbage", [b"", b"{trunc", b'{"doc": 1}', b"\xff\xfe", b"[]"])
def test_corrupt_current_is_treated_as_no_document(
    file_store: FileStateStore,
    signing_key: SigningKey,
    garbage: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (file_store.state_dir / CURRENT_FILE).write_bytes(garbage)

    with caplog.at_level(logging.WARNING):
        core = AgentCore.from_store(file_store)

    assert (core.serial, core.location_id, core.mode) == (0, None, "pull")
    assert "ignoring the stored document" in caplog.text
    # The agent recovers: the next good document replaces the corrupt file.
    envelope = signing_key.sign_envelope(make_doc(serial=1))
    assert core.offer(envelope, "test").applied
    assert file_store.load_current() == envelope


def test_unreadable_current_is_treated_as_absent(file_store: FileStateStore) -> None:
    (file_store.state_dir / CURRENT_FILE).mkdir()  # reading it raises IsADirectoryError
    assert file_store.load_current() is None
    assert AgentCore.from_store(file_store).serial == 0


def test_corrupt_status_is_ignored(file_store: FileStateStore) -> None:
    (file_store.state_dir / STATUS_FILE).write_bytes(b"{nope")
    assert file_store.load_status() is None
    assert AgentCore.from_store(file_store).status == AgentStatus()


def test_corrupt_identity_is_an_error(state_dir: Path) -> None:
    state_dir.mkdir()
    (state_dir / IDENTITY_FILE).write_text('{"agent_id": "a"}')
    with pytest.raises(CorruptStateError, match="not a valid identity"):
        FileStateStore(state_dir).load_identity()


def test_secret_is_not_in_repr(identity: Identity) -> None:
    assert identity.secret not in repr(identity)


def test_memory_store_round_trip_and_reset(identity: Identity) -> None:
    store = MemoryStateStore()
    store.save_identity(identity)
    store.save_current(b"e")
    store.save_status(AgentStatus(serial=1))
    assert (store.load_identity(), store.load_current(), store.load_status()) == (
        identity,
        b"e",
        AgentStatus(serial=1),
    )
    store.reset()
    assert (store.load_current(), store.load_status()) == (None, None)


def test_broker_credentials_and_an_optional_topic_prefix_survive_a_restart(
    tmp_path: Path, identity: Identity
) -> None:
    wire = MqttCredentials(url="mqtt://b:1883", username="agent-1", password="pw")
    response = EnrollResponse(
        agent_id="agent-1", secret="s", group_id=3, signing_key=identity.signing_key, mqtt=wire
    )
    enrolled = Identity.from_enrollment(server="http://m", response=response, hostname="h")
    assert isinstance(enrolled.mqtt, StoredMqttCredentials) and enrolled.mqtt.mqtt_prefix is None
    # The plain wire model is accepted too (e.g. by the fleet simulator).
    assert Identity(**{**identity.model_dump(), "mqtt": wire}).mqtt == enrolled.mqtt

    store = FileStateStore(tmp_path / "s")
    custom = StoredMqttCredentials(
        url="mqtt://b:1883", username="agent-1", password="pw-secret!", mqtt_prefix="acme"
    )
    store.save_identity(identity.model_copy(update={"mqtt": custom}))
    loaded = store.load_identity()
    assert loaded is not None and loaded.mqtt == custom
    assert "pw-secret!" not in repr(loaded)


def test_an_identity_stored_before_delivery_existed_loads_with_the_default_delivery(
    state_dir: Path, identity: Identity
) -> None:
    stored = identity.model_copy(
        update={"mqtt": StoredMqttCredentials(url="mqtt://b:1883", username="agent-1", password="pw")}
    ).model_dump(mode="json")
    del stored["mqtt"]["delivery"]  # as written by an agent of before `MqttCredentials.delivery`
    state_dir.mkdir()
    (state_dir / IDENTITY_FILE).write_text(json.dumps(stored))

    loaded = FileStateStore(state_dir).load_identity()

    assert loaded is not None and loaded.mqtt is not None
    assert loaded.mqtt.delivery == MqttDelivery(qos=1, persistent_session=True)
    assert (loaded.mqtt.url, loaded.mqtt.username, loaded.mqtt.password) == ("mqtt://b:1883", "agent-1", "pw")


def test_the_delivery_of_an_enrolment_is_kept(state_dir: Path, identity: Identity) -> None:
    delivery = MqttDelivery(qos=0, persistent_session=False)
    wire = MqttCredentials(url="mqtt://b:1883", username="agent-1", password="pw", delivery=delivery)
    response = EnrollResponse(
        agent_id="agent-1", secret="s", group_id=3, signing_key=identity.signing_key, mqtt=wire
    )
    enrolled = Identity.from_enrollment(server="http://m", response=response, hostname="h")
    store = FileStateStore(state_dir)
    store.save_identity(enrolled)

    loaded = store.load_identity()

    assert loaded is not None and loaded.mqtt is not None and loaded.mqtt.delivery == delivery


def test_an_identity_stored_before_pinning_existed_trusts_nothing_pinned(
    state_dir: Path, identity: Identity
) -> None:
    stored = identity.model_dump(mode="json")
    del stored["trusted_cas"]  # as written by an agent of before `Identity.trusted_cas`
    state_dir.mkdir()
    (state_dir / IDENTITY_FILE).write_text(json.dumps(stored))

    loaded = FileStateStore(state_dir).load_identity()

    assert loaded is not None and loaded.trusted_cas == []


def test_the_pinned_cas_survive_a_restart_and_must_be_certificates(
    state_dir: Path, identity: Identity
) -> None:
    pem = ManagerCA.generate().certificate_pem.decode()
    store = FileStateStore(state_dir)
    store.save_identity(identity.model_copy(update={"trusted_cas": [pem]}))
    loaded = store.load_identity()
    assert loaded is not None and loaded.trusted_cas == [pem]
    assert pem not in repr(loaded)

    stored = json.loads((state_dir / IDENTITY_FILE).read_text())
    stored["trusted_cas"] = ["not a certificate"]
    (state_dir / IDENTITY_FILE).write_text(json.dumps(stored))
    with pytest.raises(CorruptStateError, match="one PEM certificate"):
        store.load_identity()
