"""The console's Content page, in-process: the revisions of each kind (files, total size, manifest hash,
created, which is current) and a revision's manifest, as the admin API publishes them. Read-only for
everyone: publishing uploads blobs over the admin API, which the page shows how to do."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.clients import ADMIN_KEY, Admin
from tests.support.console import signed_in, write_controls


def viewer_key(admin: Admin) -> str:
    return str(admin.post("/api-keys", {"name": "auditor", "role": "viewer"})["key"])


@pytest.fixture
def published(admin: Admin) -> list[dict[str, Any]]:
    return [
        admin.publish_content("definitions", {"virus.dat": b"v1" * 100}),
        admin.publish_content("definitions", {"virus.dat": b"v2" * 100, "rules/extra.dat": b"x" * 2048}),
        admin.publish_content("signatures", {"ips.sig": b"sig"}),
    ]


@pytest.mark.parametrize("role", ["admin", "viewer"])
def test_the_page_lists_each_kinds_revisions_newest_first(
    client: TestClient, admin: Admin, published: list[dict[str, Any]], role: str
) -> None:
    signed_in(client, ADMIN_KEY if role == "admin" else viewer_key(admin))

    page = client.get("/console/content")

    assert page.status_code == 200
    assert 'href="/console/content" aria-current="page"' in page.text
    assert page.text.index("<caption>definitions</caption>") < page.text.index(
        "<caption>signatures</caption>"
    )
    first, second, signatures = published
    definitions = page.text[
        page.text.index("<caption>definitions</caption>") : page.text.index("<caption>signatures")
    ]
    assert definitions.index('data-revision="2"') < definitions.index('data-revision="1"')
    latest = definitions[definitions.index('data-revision="2"') : definitions.index('data-revision="1"')]
    assert "<td>2</td>" in latest  # files
    assert "<td>2.2 KiB</td>" in latest  # 200 + 2048 bytes
    assert f"<code>{second['manifest_sha256']}</code>" in latest
    assert "<td>Current</td>" in latest
    older = definitions[definitions.index('data-revision="1"') :]
    assert "<td>200 bytes</td>" in older and f"<code>{first['manifest_sha256']}</code>" in older
    assert "<td>Current</td>" not in older.split("</tr>")[0]
    assert signatures["manifest_sha256"] in page.text
    assert "policycast admin publish-content --kind definitions" in page.text
    assert write_controls(page.text) == []  # read-only for admins too


def test_a_revisions_manifest_shows_every_file_with_its_size_and_sha256(
    client: TestClient, admin: Admin, published: list[dict[str, Any]]
) -> None:
    signed_in(client, viewer_key(admin))

    page = client.get("/console/content/definitions/2")

    assert page.status_code == 200
    assert "definitions revision 2" in page.text
    assert published[1]["manifest_sha256"] in page.text
    rows = page.text[page.text.index('aria-label="Manifest of definitions revision 2"') :]
    assert rows.index("rules/extra.dat") < rows.index("virus.dat")  # sorted by path, as the manifest is
    assert f"<code>{hashlib.sha256(b'x' * 2048).hexdigest()}</code>" in rows
    assert 'title="2048 bytes">2.0 KiB</td>' in rows
    assert f"<code>{hashlib.sha256(b'v2' * 100).hexdigest()}</code>" in rows
    assert write_controls(page.text) == []


def test_no_content_yet_says_so(client: TestClient) -> None:
    signed_in(client, ADMIN_KEY)
    page = client.get("/console/content")
    assert page.status_code == 200 and "No content published yet." in page.text


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/console/content/definitions/9", 404),
        ("/console/content/nothing/1", 404),
        ("/console/content/Bad%20Kind/1", 422),
        (f"/console/content/definitions/{2**64}", 422),
        ("/console/content/definitions/0", 422),
    ],
)
def test_an_unknown_or_impossible_revision_is_an_error_page(
    client: TestClient, published: list[dict[str, Any]], path: str, status: int
) -> None:
    signed_in(client, ADMIN_KEY)
    page = client.get(path)
    assert page.status_code == status
    assert page.headers["content-type"].startswith("text/html") and 'role="alert"' in page.text


def test_nothing_is_published_from_the_console(
    client: TestClient, admin: Admin, published: list[dict[str, Any]]
) -> None:
    csrf = signed_in(client, ADMIN_KEY)
    answer = client.post("/console/content", data={"csrf_token": csrf, "kind": "definitions"})
    assert answer.status_code == 405
    assert [r["revision"] for r in admin.get("/content/definitions/revisions")] == [2, 1]
