"""Signing in to the console: an API key opens a session held in SQL, its cookie is HttpOnly,
SameSite=Strict and Secure, and the session ends with sign-out, the key's revocation or its expiry."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from api.main import create_app
from fabric_core.settings import Settings
from manager_db.models import ConsoleSession, utcnow
from tests.support.clients import ADMIN_KEY, Admin
from tests.support.console import signed_in
from tests.support.waiting import wait_for

BASE = "https://testserver"


@pytest.fixture
def browser(settings: Settings) -> Iterator[TestClient]:
    """A client as a browser is one: its own cookie jar, on HTTPS (the cookie is Secure)."""
    with TestClient(create_app(settings), base_url=BASE) as client:
        yield client


@pytest.fixture
def admin(browser: TestClient) -> Admin:
    return Admin(browser)


def _key(admin: Admin, role: str) -> dict[str, Any]:
    made: dict[str, Any] = admin.post("/api-keys", {"name": f"{role}-key", "role": role})
    return made


def _sessions(client: TestClient) -> list[ConsoleSession]:
    with Session(client.app.state.fabric.engine) as session:  # type: ignore[attr-defined]
        return list(session.exec(select(ConsoleSession)).all())


def test_a_page_without_a_session_sends_the_operator_to_sign_in_and_back(browser: TestClient) -> None:
    answer = browser.get("/console/clients?tab=policies", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/signin?next=/console/clients"
    live = browser.get("/console/groups/1/clients-table", headers={"HX-Request": "true"})
    assert live.status_code == 200 and live.headers["HX-Redirect"].startswith("/console/signin")


def test_signing_in_sets_a_session_cookie_that_scripts_and_other_sites_never_see(browser: TestClient) -> None:
    page = browser.get("/console/signin")
    token = re.search(r'name="signin_token" value="([^"]+)"', page.text)
    assert token is not None
    answer = browser.post(
        "/console/signin",
        data={"api_key": ADMIN_KEY, "signin_token": token.group(1), "next": "/console/clients"},
        follow_redirects=False,
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/console/clients"
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("policycast_session="))
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/console"} <= attributes
    home = browser.get("/console/clients")
    assert home.status_code == 200 and "bootstrap" in home.text and "Sign Out" in home.text
    # Only hashes are stored: neither the cookie's id nor the API key is in the table.
    (row,) = _sessions(browser)
    session_id = cookie.split(";")[0].split("=", 1)[1]
    assert session_id not in repr(row.model_dump()) and ADMIN_KEY not in repr(row.model_dump())


def test_every_console_answer_forbids_framing_inline_script_and_caching(browser: TestClient) -> None:
    for path in ("/console/signin", "/console/clients"):
        answer = browser.get(path, follow_redirects=False)
        policy = answer.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert answer.headers["x-frame-options"] == "DENY" and answer.headers["cache-control"] == "no-store"


def test_a_wrong_key_is_refused_in_the_page_and_opens_nothing(browser: TestClient) -> None:
    page = browser.get("/console/signin")
    token = re.search(r'name="signin_token" value="([^"]+)"', page.text)
    assert token is not None
    answer = browser.post("/console/signin", data={"api_key": "pck_wrong", "signin_token": token.group(1)})
    assert answer.status_code == 401
    assert "unknown or revoked API key" in answer.text and 'aria-invalid="true"' in answer.text
    assert "policycast_session" not in answer.headers.get("set-cookie", "")
    assert _sessions(browser) == []
    metrics = browser.get("/metrics").text
    assert 'policycast_auth_failures_total{api="admin"} 1.0' in metrics


def test_a_sign_in_posted_from_elsewhere_is_refused(browser: TestClient) -> None:
    """Login CSRF: a form on another site cannot sign the browser in to an attacker's session."""
    answer = browser.post("/console/signin", data={"api_key": ADMIN_KEY, "signin_token": "forged"})
    assert answer.status_code == 403 and "expired" in answer.text
    assert _sessions(browser) == []


def test_after_sign_in_the_operator_goes_back_to_a_console_page_only(browser: TestClient) -> None:
    for target in ("https://evil.example/", "//evil.example/console/", "/api/v1/groups"):
        page = browser.get("/console/signin")
        token = re.search(r'name="signin_token" value="([^"]+)"', page.text)
        assert token is not None
        answer = browser.post(
            "/console/signin",
            data={"api_key": ADMIN_KEY, "signin_token": token.group(1), "next": target},
            follow_redirects=False,
        )
        assert answer.headers["location"] == "/console/clients", target


def test_signing_out_ends_the_session_for_a_copied_cookie_too(browser: TestClient) -> None:
    csrf = signed_in(browser, ADMIN_KEY)
    copied = browser.cookies.get("policycast_session")
    refused = browser.post("/console/signout", data={"csrf_token": "wrong"})
    assert refused.status_code == 403  # a page elsewhere cannot sign the operator out either
    out = browser.post("/console/signout", data={"csrf_token": csrf}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/console/signin"
    browser.cookies.set("policycast_session", copied or "", domain="testserver", path="/console")
    again = browser.get("/console/clients", follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"].startswith("/console/signin")


def test_revoking_the_key_ends_its_sessions(browser: TestClient, admin: Admin) -> None:
    viewer = _key(admin, "viewer")
    signed_in(browser, viewer["key"])
    admin.delete(f"/api-keys/{viewer['id']}")
    wait_for(
        lambda: browser.get("/console/clients", follow_redirects=False),
        until=lambda answer: answer.status_code == 303,
        timeout=10,
        what="the revoked key's session to end",
    )


def test_an_expired_session_sends_the_operator_to_sign_in(browser: TestClient) -> None:
    signed_in(browser, ADMIN_KEY)
    with Session(browser.app.state.fabric.engine) as session:  # type: ignore[attr-defined]
        row = session.exec(select(ConsoleSession)).one()
        row.expires_at = utcnow() - timedelta(seconds=1)
        session.add(row)
        session.commit()
    answer = browser.get("/console/clients", follow_redirects=False)
    assert answer.status_code == 303


def test_an_unknown_console_page_or_method_is_an_error_page_not_json(browser: TestClient) -> None:
    signed_in(browser, ADMIN_KEY)
    missing = browser.get("/console/no-such-page")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    wrong = browser.put("/console/clients")
    assert wrong.status_code == 405 and "<html" in wrong.text
    assert browser.get("/api/v1/no-such-thing").headers["content-type"] == "application/json"
