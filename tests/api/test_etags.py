"""Conditional GETs on the agent API: `If-None-Match` with RFC 9110's weak comparison and `*`."""

from __future__ import annotations

from typing import Any

import pytest

from api.etags import none_match


@pytest.mark.parametrize(
    ("header", "etag", "matches"),
    [
        (None, '"8"', False),
        ('"8"', '"8"', True),
        ('W/"8"', '"8"', True),  # weak comparison: a weak tag matches the strong one
        ('"7", W/"8"', '"8"', True),
        ('"7","8"', '"8"', True),
        ("*", '"8"', True),
        (" * ", '"8"', True),
        ('"7"', '"8"', False),
        ('W/"7"', '"8"', False),
        ("8", '"8"', False),  # not an entity tag
        ('"a,b"', '"a,b"', True),  # a comma inside the quotes is part of the tag
        ('"a"', '"a,b"', False),
        ("", '"8"', False),
    ],
)
def test_none_match(header, etag, matches):
    assert none_match(header, etag) is matches


def _routes(admin: Any, agent: Any) -> dict[str, str]:
    revision = admin.publish_content("definitions", {"virus.db": b"signatures"})
    sha256 = revision["files"][0]["sha256"]
    agent.heartbeat(serial=0)
    return {
        "config": "/agent/v1/config",
        "manifest": f"/agent/v1/content/definitions/{revision['revision']}",
        "blob": f"/agent/v1/blobs/{sha256}",
    }


@pytest.mark.parametrize("route", ["config", "manifest", "blob"])
def test_if_none_match_on_every_conditional_route(admin, enroll, route):
    agent = enroll()
    path = _routes(admin, agent)[route]
    first = agent.raw("GET", path)
    assert first.status_code == 200
    etag = first.headers["etag"]

    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = agent.raw("GET", path, headers={"If-None-Match": header})
        assert again.status_code == 304, header
        assert again.headers["etag"] == etag and again.content == b""
    for header in ('"other"', 'W/"other"', etag.strip('"')):
        assert agent.raw("GET", path, headers={"If-None-Match": header}).status_code == 200, header


def test_if_none_match_star_on_something_that_does_not_exist_is_still_404(admin, enroll):
    agent = enroll()
    assert (
        agent.raw("GET", "/agent/v1/content/definitions/7", headers={"If-None-Match": "*"}).status_code == 404
    )
    missing = "/agent/v1/blobs/" + "0" * 64
    assert agent.raw("GET", missing, headers={"If-None-Match": "*"}).status_code == 404


def test_a_range_beyond_the_blob_is_416_in_the_one_error_shape(admin, enroll):
    agent = enroll()
    path = _routes(admin, agent)["blob"]
    answer = agent.raw("GET", path, headers={"Range": "bytes=100-"})
    assert answer.status_code == 416
    assert answer.headers["content-range"] == "bytes */10"
    assert "beyond the end" in answer.json()["detail"]


@pytest.mark.parametrize("header", ["bytes", "lines=1-", "bytes=5-2", "bytes=x-"])
def test_a_range_that_cannot_be_parsed_is_ignored(admin, enroll, header):
    """RFC 9110 section 14.2: the whole file, rather than a plain-text 400."""
    agent = enroll()
    answer = agent.raw("GET", _routes(admin, agent)["blob"], headers={"Range": header})
    assert (answer.status_code, answer.content) == (200, b"signatures")


def test_a_range_to_resume_still_works(admin, enroll):
    agent = enroll()
    answer = agent.raw("GET", _routes(admin, agent)["blob"], headers={"Range": "bytes=4-"})
    assert (answer.status_code, answer.content) == (206, b"atures")
