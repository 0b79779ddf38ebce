"""Content revisions: content-addressed uploads, manifests in documents, Range downloads, retention."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from fabric_core.settings import Settings
from tests.support.clients import Admin, AgentClient


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(admin: Admin, kind: str, files: dict[str, bytes], expect: int = 201) -> Any:
    """`Admin.publish_content` (a function, for tests/agent_stub/test_content.py, which imports it)."""
    return admin.publish_content(kind, files, expect)


@pytest.fixture
def small_retention(settings: Settings) -> Iterator[Admin]:
    with TestClient(create_app(settings.model_copy(update={"content_retention": 2}))) as client:
        yield Admin(client)


def test_a_blob_is_stored_only_if_its_bytes_match_its_name(admin: Admin) -> None:
    data = b"definitions v1"
    wrong = admin.client.put(f"/api/v1/blobs/{sha(b'other')}", content=data, headers=admin.headers)
    assert wrong.status_code == 422 and "hash" in wrong.json()["detail"]
    assert admin.client.head(f"/api/v1/blobs/{sha(b'other')}", headers=admin.headers).status_code == 404

    digest = admin.upload(data)
    assert admin.client.head(f"/api/v1/blobs/{digest}", headers=admin.headers).status_code == 200


def test_uploads_may_exceed_the_ordinary_body_limit_up_to_the_blob_limit(admin: Admin) -> None:
    big = b"x" * (admin.client.app.state.settings.max_body_bytes + 1)  # type: ignore[attr-defined]
    admin.upload(big)


def test_publishing_a_revision_puts_it_in_every_document(admin: Admin) -> None:
    root = admin.root()
    child = admin.group("Servers", root["id"], inherit=False)
    before = {g: admin.effective(g)["serial"] for g in (root["id"], child["id"])}

    revision = publish(admin, "definitions", {"virus.db": b"sigs-1", "rules/extra.db": b"rules-1"})

    assert revision["revision"] == 1
    assert [f["path"] for f in revision["files"]] == ["rules/extra.db", "virus.db"]  # sorted
    for group_id, serial in before.items():
        doc = admin.effective(group_id)
        assert doc["serial"] > serial
        assert doc["content"] == {
            "definitions": {"revision": 1, "manifest_sha256": revision["manifest_sha256"]}
        }
    assert publish(admin, "definitions", {"virus.db": b"sigs-2"})["revision"] == 2


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ([{"path": "../etc/passwd", "sha256": "0" * 64}], "relative"),
        ([{"path": "/abs", "sha256": "0" * 64}], "relative"),
        ([{"path": "a.db", "sha256": "0" * 64}], "not been uploaded"),
    ],
)
def test_bad_revisions_are_refused_and_change_nothing(admin: Admin, files: list[Any], reason: str) -> None:
    serial = admin.effective(admin.root()["id"])["serial"]
    answer = admin.post("/content/definitions/revisions", {"files": files}, expect=422)
    assert reason in answer["detail"]
    assert admin.get("/content/definitions/revisions") == []
    assert admin.effective(admin.root()["id"])["serial"] == serial


def test_a_path_listed_twice_is_refused(admin: Admin) -> None:
    digest = admin.upload(b"one")
    files = [{"path": "a.db", "sha256": digest}, {"path": "a.db", "sha256": digest}]
    assert "twice" in admin.post("/content/definitions/revisions", {"files": files}, expect=422)["detail"]


def test_agents_fetch_manifests_with_etags_and_blobs_with_ranges(admin: Admin, enroll: Any) -> None:
    agent: AgentClient = enroll()
    data = bytes(range(256)) * 40
    revision = publish(admin, "definitions", {"virus.db": data})

    manifest = agent.raw("GET", "/agent/v1/content/definitions/1")
    assert manifest.status_code == 200 and manifest.json()["files"] == revision["files"]
    etag = manifest.headers["etag"]
    assert (
        agent.raw("GET", "/agent/v1/content/definitions/1", headers={"If-None-Match": etag}).status_code
        == 304
    )

    digest = revision["files"][0]["sha256"]
    whole = agent.raw("GET", f"/agent/v1/blobs/{digest}")
    assert whole.status_code == 200 and whole.content == data and whole.headers["etag"] == f'"{digest}"'
    rest = agent.raw("GET", f"/agent/v1/blobs/{digest}", headers={"Range": "bytes=1000-"})
    assert rest.status_code == 206 and rest.content == data[1000:]

    assert agent.raw("GET", f"/agent/v1/blobs/{'0' * 64}").status_code == 404
    assert admin.client.get(f"/agent/v1/blobs/{digest}").status_code == 401  # agents only


def test_retention_keeps_the_newest_and_what_agents_still_hold(small_retention: Admin) -> None:
    admin = small_retention
    agent = admin.enroll(hostname="h")
    shared = b"shared by every revision"
    publish(admin, "definitions", {"base.db": shared, "r1.db": b"only in 1"})
    agent.heartbeat(status={"content": {"definitions": 1}})  # this agent still holds revision 1
    admin.client.app.state.fabric.ledger.flush(admin.client.app.state.fabric.engine)  # type: ignore[attr-defined]
    for n in (2, 3, 4):
        publish(admin, "definitions", {"base.db": shared, f"r{n}.db": f"only in {n}".encode()})

    kept = [r["revision"] for r in admin.get("/content/definitions/revisions")]
    assert kept == [4, 3, 1]  # the newest two, and the one an agent holds; 2 is gone

    store = Path(admin.client.app.state.settings.blob_dir)  # type: ignore[attr-defined]
    assert not (store / sha(b"only in 2")[:2] / sha(b"only in 2")).exists()
    for survivor in (shared, b"only in 1", b"only in 3", b"only in 4"):
        assert (store / sha(survivor)[:2] / sha(survivor)).exists()


def test_viewers_cannot_upload(admin: Admin) -> None:
    from sqlmodel import Session

    from api.services.api_keys import create_api_key

    with Session(admin.client.app.state.fabric.engine) as session:  # type: ignore[attr-defined]
        viewer = create_api_key(session, name="auditor", role="viewer")
    data = b"nope"
    response = admin.client.put(
        f"/api/v1/blobs/{sha(data)}", content=data, headers={"Authorization": f"Bearer {viewer}"}
    )
    assert response.status_code == 403


def test_a_blob_the_agent_already_has_is_not_sent_again(admin: Admin, enroll: Any) -> None:
    agent: AgentClient = enroll()
    digest = publish(admin, "definitions", {"virus.db": b"sigs"})["files"][0]["sha256"]
    again = agent.raw("GET", f"/agent/v1/blobs/{digest}", headers={"If-None-Match": f'"{digest}"'})
    assert again.status_code == 304 and again.content == b""


def test_reserved_kinds_are_refused(admin: Admin) -> None:
    digest = admin.upload(b"x")
    answer = admin.post("/content/blobs/revisions", {"files": [{"path": "a", "sha256": digest}]}, expect=422)
    assert "reserved" in answer["detail"]
