"""The Policies tab of a group, in-process: what admins and viewers are shown, CSRF on every write,
refused input shown at its field, and every change read back through the admin API."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from fabric_core.settings import Settings
from tests.support.clients import ADMIN_KEY, Admin
from tests.support.console import signed_in

BASE = "https://testserver"
HTMX = {"HX-Request": "true"}


@pytest.fixture
def browser(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), base_url=BASE) as client:
        yield client


@pytest.fixture
def admin(browser: TestClient) -> Admin:
    return Admin(browser)


@pytest.fixture
def sales(admin: Admin) -> int:
    return int(admin.group("Sales", int(admin.root()["id"]))["id"])


def _viewer(browser: TestClient, admin: Admin) -> str:
    made: dict[str, Any] = admin.post("/api-keys", {"name": "auditor", "role": "viewer"})
    return str(made["key"])


def _dialog_form(csrf: str, **fields: str) -> dict[str, str]:
    return {"csrf_token": csrf, "mode": "push", "heartbeat_value": "5", "heartbeat_unit": "minutes", **fields}


def test_the_tab_shows_the_inheritance_checkbox_with_the_parents_name(
    browser: TestClient, admin: Admin, sales: int
) -> None:
    signed_in(browser, ADMIN_KEY)
    page = browser.get(f"/console/clients?group={sales}&tab=policies")
    assert page.status_code == 200
    assert 'Inherit policies and settings from the parent group "My Company"' in page.text
    assert 'id="inherit" name="inherit" checked' in page.text
    assert "Location-independent Policies and Settings" in page.text
    # Inheriting, the group's settings are its parent's and cannot be edited here.
    assert f'hx-get="/console/groups/{sales}/communication"' not in page.text


def test_unchecking_inheritance_gives_the_group_its_own_settings(
    browser: TestClient, admin: Admin, sales: int
) -> None:
    csrf = signed_in(browser, ADMIN_KEY)
    pane = browser.post(f"/console/groups/{sales}/inherit", data={"csrf_token": csrf}, headers=HTMX)
    assert pane.status_code == 200 and "Communications Settings</button>" in pane.text
    assert admin.get(f"/groups/{sales}")["inherit"] is False
    again = browser.post(
        f"/console/groups/{sales}/inherit", data={"csrf_token": csrf, "inherit": "on"}, headers=HTMX
    )
    assert again.status_code == 200 and admin.get(f"/groups/{sales}")["inherit"] is True


def test_the_dialog_saves_the_groups_communications_settings(
    browser: TestClient, admin: Admin, sales: int
) -> None:
    csrf = signed_in(browser, ADMIN_KEY)
    browser.post(f"/console/groups/{sales}/inherit", data={"csrf_token": csrf}, headers=HTMX)
    dialog = browser.get(f"/console/groups/{sales}/communication", headers=HTMX)
    assert "Communications Settings for Sales" in dialog.text
    assert "Download policies and content from the management server" in dialog.text
    saved = browser.post(
        f"/console/groups/{sales}/communication",
        data=_dialog_form(
            csrf, mode="pull", heartbeat_value="2", heartbeat_unit="hours", download_enabled="on"
        ),
        headers=HTMX,
    )
    assert saved.status_code == 200 and "Communications Settings for Sales saved." in saved.text
    assert '<div id="dialog" hx-swap-oob="true"></div>' in saved.text  # the dialog closes
    stored = admin.get(f"/groups/{sales}/communication")
    assert (stored["mode"], stored["heartbeat_s"], stored["download_enabled"]) == ("pull", 7200, True)


def test_a_refused_interval_is_shown_at_its_field_and_changes_nothing(
    browser: TestClient, admin: Admin, sales: int
) -> None:
    csrf = signed_in(browser, ADMIN_KEY)
    browser.post(f"/console/groups/{sales}/inherit", data={"csrf_token": csrf}, headers=HTMX)
    before = admin.get(f"/groups/{sales}/communication")
    refused = browser.post(
        f"/console/groups/{sales}/communication",
        data=_dialog_form(csrf, mode="pull", heartbeat_value="25", heartbeat_unit="hours"),
        headers=HTMX,
    )
    assert refused.status_code == 422 and refused.headers["HX-Retarget"] == "#dialog"
    assert re.search(r'id="heartbeat-value"[^>]*value="25"[^>]*aria-invalid="true"', refused.text)
    assert "between 1 minute and 24 hours" in refused.text
    assert admin.get(f"/groups/{sales}/communication") == before


def test_a_location_leaves_the_group_settings_and_gets_its_own(
    browser: TestClient, admin: Admin, sales: int
) -> None:
    csrf = signed_in(browser, ADMIN_KEY)
    browser.post(f"/console/groups/{sales}/inherit", data={"csrf_token": csrf}, headers=HTMX)
    admin.communication(sales, heartbeat_s=600)
    location = admin.default_location(sales)["id"]
    base = f"/console/groups/{sales}/locations/{location}"
    refused = browser.get(f"{base}/communication", headers=HTMX)
    assert refused.status_code == 422 and "Use Group Communications Settings" in refused.text
    pane = browser.post(f"{base}/use-group-settings", data={"csrf_token": csrf}, headers=HTMX)
    assert pane.status_code == 200 and "Local - Push</button>" in pane.text
    local = admin.get(f"/groups/{sales}/locations/{location}/communication")
    assert local["use_group_settings"] is False and local["heartbeat_s"] == 600  # the group's, copied
    browser.post(
        f"{base}/communication",
        data=_dialog_form(csrf, mode="pull", heartbeat_value="30", heartbeat_unit="minutes"),
        headers=HTMX,
    )
    local = admin.get(f"/groups/{sales}/locations/{location}/communication")
    assert (local["effective"]["mode"], local["effective"]["heartbeat_s"]) == ("pull", 1800)


def test_a_write_without_the_sessions_csrf_token_is_refused_and_changes_nothing(
    browser: TestClient, admin: Admin, sales: int
) -> None:
    signed_in(browser, ADMIN_KEY)
    for data in ({}, {"csrf_token": "not-the-sessions"}):
        refused = browser.post(f"/console/groups/{sales}/inherit", data=data, headers=HTMX)
        assert refused.status_code == 403 and "CSRF token" in refused.text
        assert refused.headers["HX-Retarget"] == "#messages"
    assert admin.get(f"/groups/{sales}")["inherit"] is True


def test_a_viewer_is_shown_no_write_control_and_a_forged_write_is_refused(
    browser: TestClient, admin: Admin, sales: int
) -> None:
    admin.patch(f"/groups/{sales}", {"inherit": False})
    csrf = signed_in(browser, _viewer(browser, admin))
    tab = browser.get(f"/console/clients?group={sales}&tab=policies").text
    clients = browser.get(f"/console/clients?group={sales}").text
    for page in (tab, clients):
        assert "<form" not in page.replace('<form method="post" action="/console/signout"', "")
        assert "<select" not in page and 'type="checkbox"' not in page
    assert "Does not inherit policies and settings" in tab and "Update policy now" not in clients
    forged = browser.post(
        f"/console/groups/{sales}/communication", data=_dialog_form(csrf, mode="pull"), headers=HTMX
    )
    assert forged.status_code == 403 and "viewer" in forged.text
    assert admin.get(f"/groups/{sales}/communication")["mode"] == "push"


def test_an_error_from_the_services_is_shown_in_the_page_never_as_json(
    browser: TestClient, admin: Admin
) -> None:
    csrf = signed_in(browser, ADMIN_KEY)
    root = int(admin.root()["id"])
    # The root group has no parent to inherit from: the service refuses with 409.
    refused = browser.post(
        f"/console/groups/{root}/inherit", data={"csrf_token": csrf, "inherit": "on"}, headers=HTMX
    )
    assert refused.status_code == 409 and refused.headers["content-type"].startswith("text/html")
    assert "the root group cannot inherit" in refused.text
    missing = browser.get("/console/clients?group=999999")
    assert missing.status_code == 404 and "group 999999" in missing.text and "<html" in missing.text
