"""The CAs agents trust: the manager's own from its first start, what `GET /agent/v1/ca` serves before
enrolment, the join token, and the steps of a rotation through the admin API (every document names the
trusted CAs, so each step is a new serial for every document)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from fabric_core.settings import Settings
from fabric_core.tls import ManagerCA, ca_hash, split_certificates, split_join_token
from tests.support.clients import Admin


def _named(admin: Admin) -> list[str]:
    """The hashes of the CAs the root's document names, oldest first."""
    doc = admin.effective(admin.root()["id"])
    return [ca_hash(pem.encode()) for pem in doc["trust"]["ca_certificates"]]


def test_the_manager_trusts_its_own_ca_from_its_first_start(admin: Admin, settings: Settings) -> None:
    own = ManagerCA.load_or_create(settings.tls_dir)  # made by the app's first start
    assert _named(admin) == [own.hash]
    assert [row["sha256"] for row in admin.get("/tls/trusted-cas")] == [own.hash]


def test_the_ca_is_served_without_credentials_before_enrolment(
    client: TestClient, settings: Settings
) -> None:
    response = client.get("/agent/v1/ca")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-pem-file")
    own = ManagerCA.load_or_create(settings.tls_dir)
    assert [ca_hash(pem) for pem in split_certificates(response.content)] == [own.hash]


def test_an_enrolment_token_carries_the_ca_hash(admin: Admin, settings: Settings) -> None:
    answer = admin.post(f"/groups/{admin.root()['id']}/enrollment-tokens", {})
    own = ManagerCA.load_or_create(settings.tls_dir).hash
    assert answer["ca_hash"] == own
    assert split_join_token(answer["join_token"]) == (answer["token"], own)


def test_a_rotation_adds_a_ca_to_every_document_and_retires_the_old_one(admin: Admin) -> None:
    old = _named(admin)[0]
    serial = admin.effective(admin.root()["id"])["serial"]
    successor = ManagerCA.generate("the next CA")

    added = admin.post("/tls/trusted-cas", {"pem": successor.certificate_pem.decode()})
    assert added["sha256"] == successor.hash
    assert _named(admin) == [old, successor.hash]
    assert admin.effective(admin.root()["id"])["serial"] > serial
    assert admin.client.get("/agent/v1/ca").content.count(b"BEGIN CERTIFICATE") == 2

    admin.delete(f"/tls/trusted-cas/{old}")
    assert _named(admin) == [successor.hash]
    refusal = admin.delete(f"/tls/trusted-cas/{successor.hash}", expect=409)
    assert "only trusted CA" in refusal["detail"]
    assert _named(admin) == [successor.hash]


def test_adding_a_ca_twice_changes_nothing(admin: Admin) -> None:
    successor = ManagerCA.generate("the next CA")
    admin.post("/tls/trusted-cas", {"pem": successor.certificate_pem.decode()})
    serial = admin.effective(admin.root()["id"])["serial"]
    admin.post("/tls/trusted-cas", {"pem": successor.certificate_pem.decode()})
    assert admin.effective(admin.root()["id"])["serial"] == serial
    assert len(admin.get("/tls/trusted-cas")) == 2


def test_what_is_not_one_certificate_is_refused_and_changes_nothing(admin: Admin) -> None:
    before = admin.get("/tls/trusted-cas")
    one, two = ManagerCA.generate("a"), ManagerCA.generate("b")
    for pem in ("not a certificate", (one.certificate_pem + two.certificate_pem).decode()):
        refusal = admin.post("/tls/trusted-cas", {"pem": pem}, expect=422)
        assert "exactly one PEM certificate" in str(refusal["detail"])
    assert admin.get("/tls/trusted-cas") == before


def test_retiring_an_unknown_or_malformed_hash_is_refused(admin: Admin) -> None:
    admin.delete(f"/tls/trusted-cas/sha256:{'0' * 64}", expect=404)
    admin.delete("/tls/trusted-cas/md5:abc", expect=422)


def test_a_viewer_may_read_the_trusted_cas_but_not_change_them(admin: Admin) -> None:
    viewer = Admin(admin.client, admin.post("/api-keys", {"role": "viewer"})["key"])
    assert len(viewer.get("/tls/trusted-cas")) == 1
    viewer.post("/tls/trusted-cas", {"pem": ManagerCA.generate("x").certificate_pem.decode()}, expect=403)
