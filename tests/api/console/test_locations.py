"""The console's Manage Locations page of a group, in-process: Default first, Add Location with its
conditions (JSON checked at the field, then by the admin API's condition model), edit, delete (never
Default); an inheriting group shows its owner's locations read-only; viewers read only; every write
CSRF-checked and read back through the admin API."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.clients import ADMIN_KEY, Admin
from tests.support.console import field_error, page_message, signed_in, write_controls

OFFICE = [{"type": "ip_range", "cidr": "10.1.0.0/16", "weight": 2}]


def viewer_key(admin: Admin) -> str:
    return str(admin.post("/api-keys", {"name": "auditor", "role": "viewer"})["key"])


@pytest.fixture
def sales(admin: Admin) -> dict[str, Any]:
    """A group with locations of its own: Default and Office."""
    group = admin.group("Sales", admin.root()["id"], inherit=False)
    admin.post(f"/groups/{group['id']}/locations", {"name": "Office", "conditions": OFFICE})
    return group


def locations(admin: Admin, group: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = admin.get(f"/groups/{group['id']}/locations")
    return found


def test_the_policies_tab_links_to_manage_locations(client: TestClient, sales: dict[str, Any]) -> None:
    signed_in(client, ADMIN_KEY)
    tab = client.get(f"/console/clients?group={sales['id']}&tab=policies")
    assert f'<a href="/console/groups/{sales["id"]}/locations">Manage Locations</a>' in tab.text


def test_the_page_lists_default_first_with_each_locations_conditions(
    client: TestClient, admin: Admin, sales: dict[str, Any]
) -> None:
    signed_in(client, ADMIN_KEY)

    page = client.get(f"/console/groups/{sales['id']}/locations")

    assert page.status_code == 200
    assert "Manage Locations: Sales" in page.text
    assert page.text.index("Location: Default") < page.text.index("Location: Office")
    office = next(loc for loc in locations(admin, sales) if loc["name"] == "Office")
    assert f'id="location-{office["id"]}-conditions"' in page.text
    assert "10.1.0.0/16" in page.text
    for label in (
        "Location name",
        "Location conditions (JSON array)",
        "Conditions of location Office (JSON array)",
    ):
        assert f">{label}</label>" in page.text
    assert 'aria-label="Delete location Office"' in page.text
    assert 'aria-label="Delete location Default"' not in page.text  # Default cannot be deleted


def test_a_viewer_reads_the_locations_and_has_no_control_to_change_them(
    client: TestClient, admin: Admin, sales: dict[str, Any]
) -> None:
    signed_in(client, viewer_key(admin))

    page = client.get(f"/console/groups/{sales['id']}/locations")

    assert page.status_code == 200 and "Location: Office" in page.text and "10.1.0.0/16" in page.text
    assert write_controls(page.text) == []


def test_an_inheriting_group_shows_its_owners_locations_read_only(
    client: TestClient, admin: Admin, sales: dict[str, Any]
) -> None:
    east = admin.group("East", sales["id"])  # inherits from Sales
    signed_in(client, ADMIN_KEY)

    page = client.get(f"/console/groups/{east['id']}/locations")

    assert page.status_code == 200
    assert 'inherits policies and settings from the parent group "Sales"' in page.text
    assert "these are Sales's locations, shown read-only" in page.text
    assert "Location: Office" in page.text
    assert write_controls(page.text) == []


def test_a_viewers_forged_writes_are_refused_and_change_nothing(
    client: TestClient, admin: Admin, sales: dict[str, Any]
) -> None:
    before = locations(admin, sales)
    office = next(loc for loc in before if loc["name"] == "Office")
    csrf = signed_in(client, viewer_key(admin))
    base = f"/console/groups/{sales['id']}/locations"

    answers = [
        client.post(base, data={"csrf_token": csrf, "name": "Home", "conditions": "[]"}),
        client.post(
            f"{base}/{office['id']}", data={"csrf_token": csrf, "name": "Office", "conditions": "[]"}
        ),
        client.post(f"{base}/{office['id']}/delete", data={"csrf_token": csrf}),
    ]

    assert [answer.status_code for answer in answers] == [403, 403, 403]
    assert locations(admin, sales) == before


@pytest.mark.parametrize("token", [None, "not-the-token"])
def test_a_write_without_the_sessions_csrf_token_is_refused(
    client: TestClient, admin: Admin, sales: dict[str, Any], token: str | None
) -> None:
    before = locations(admin, sales)
    office = next(loc for loc in before if loc["name"] == "Office")
    signed_in(client, ADMIN_KEY)
    csrf = {} if token is None else {"csrf_token": token}
    base = f"/console/groups/{sales['id']}/locations"

    answers = [
        client.post(base, data={**csrf, "name": "Home", "conditions": "[]"}),
        client.post(f"{base}/{office['id']}", data={**csrf, "name": "Office", "conditions": "[]"}),
        client.post(f"{base}/{office['id']}/delete", data=csrf),
    ]

    assert [answer.status_code for answer in answers] == [403, 403, 403]
    assert locations(admin, sales) == before


def test_add_a_location_with_conditions(client: TestClient, admin: Admin, sales: dict[str, Any]) -> None:
    csrf = signed_in(client, ADMIN_KEY)
    conditions = [
        {"type": "network_type", "value": "vpn", "weight": 5},
        {"type": "fact", "name": "site", "equals": "home"},
    ]

    answer = client.post(
        f"/console/groups/{sales['id']}/locations",
        data={"csrf_token": csrf, "name": "Remote", "conditions": json.dumps(conditions)},
    )

    assert answer.status_code == 200 and page_message(answer.text) == "Location added."
    remote = next(loc for loc in locations(admin, sales) if loc["name"] == "Remote")
    # Stored as the admin API stores them: defaults filled in, absent optional fields left out.
    assert remote["conditions"] == [conditions[0], {**conditions[1], "weight": 1}]
    assert not remote["is_default"]
    assert any(entry["name"] == "Remote" for entry in admin.effective(sales["id"])["locations"])


def test_edit_a_locations_name_and_conditions(
    client: TestClient, admin: Admin, sales: dict[str, Any]
) -> None:
    office = next(loc for loc in locations(admin, sales) if loc["name"] == "Office")
    csrf = signed_in(client, ADMIN_KEY)
    conditions = [{"type": "dns_server", "address": "10.1.0.53", "weight": 3}]

    answer = client.post(
        f"/console/groups/{sales['id']}/locations/{office['id']}",
        data={"csrf_token": csrf, "name": "Head office", "conditions": json.dumps(conditions)},
    )

    assert answer.status_code == 200 and page_message(answer.text) == "Location saved."
    edited = admin.get(f"/groups/{sales['id']}/locations/{office['id']}")
    assert (edited["name"], edited["conditions"]) == ("Head office", conditions)


@pytest.mark.parametrize(
    ("conditions", "reason"),
    [
        (
            '[{"type": "ip_range", "cidr": "10.1.0.0/16"',
            "is not valid JSON: Expecting ',' delimiter at line 1, column 44",
        ),
        ('{"type": "ip_range"}', "must be a JSON array, not an object"),
        ('[{"type": "ip_range", "cidr": "not a network"}]', "condition 1, ip_range, cidr"),
        ('[{"type": "gps", "where": "here"}]', "condition 1: Input tag 'gps'"),
        ('[{"type": "fact", "name": "site"}]', "exactly one of equals or matches"),
        (
            '[{"type": "network_type", "value": "vpn", "weight": "5"}]',
            "weight: Input should be a valid integer",
        ),
        (
            '[{"type": "network_type", "value": "vpn", "weight": 0}]',
            "weight: Input should be greater than or equal to 1",
        ),
        (
            '[{"type": "fact", "name": "site", "matches": "(a)\\\\1"}]',
            "condition 1, fact",
        ),  # no back-references
    ],
)
def test_conditions_the_admin_api_would_refuse_are_refused_at_the_field(
    client: TestClient, admin: Admin, sales: dict[str, Any], conditions: str, reason: str
) -> None:
    before = locations(admin, sales)
    office = next(loc for loc in before if loc["name"] == "Office")
    csrf = signed_in(client, ADMIN_KEY)
    base = f"/console/groups/{sales['id']}/locations"

    added = client.post(base, data={"csrf_token": csrf, "name": "Remote", "conditions": conditions})
    edited = client.post(
        f"{base}/{office['id']}", data={"csrf_token": csrf, "name": "Office", "conditions": conditions}
    )

    assert added.status_code == 422 and edited.status_code == 422
    assert reason in (field_error(added.text, "new-location-conditions") or "")
    assert reason in (field_error(edited.text, f"location-{office['id']}-conditions") or "")
    assert field_error(edited.text, "new-location-conditions") is None  # only the form that was sent
    assert locations(admin, sales) == before


def test_a_name_the_group_already_has_is_refused_at_the_name(
    client: TestClient, admin: Admin, sales: dict[str, Any]
) -> None:
    before = locations(admin, sales)
    csrf = signed_in(client, ADMIN_KEY)

    answer = client.post(
        f"/console/groups/{sales['id']}/locations",
        data={"csrf_token": csrf, "name": "office", "conditions": "[]"},
    )

    assert answer.status_code == 409
    assert "already has a location named" in (field_error(answer.text, "new-location-name") or "")
    assert field_error(answer.text, "new-location-conditions") is None
    assert locations(admin, sales) == before


def test_delete_a_location_but_never_default(client: TestClient, admin: Admin, sales: dict[str, Any]) -> None:
    before = locations(admin, sales)
    office = next(loc for loc in before if loc["name"] == "Office")
    default = next(loc for loc in before if loc["is_default"])
    csrf = signed_in(client, ADMIN_KEY)
    base = f"/console/groups/{sales['id']}/locations"

    refused = client.post(f"{base}/{default['id']}/delete", data={"csrf_token": csrf})
    assert refused.status_code == 409
    assert "Default location cannot be deleted" in (page_message(refused.text) or "")
    assert locations(admin, sales) == before

    deleted = client.post(f"{base}/{office['id']}/delete", data={"csrf_token": csrf})
    assert deleted.status_code == 200 and page_message(deleted.text) == "Location deleted."
    assert locations(admin, sales) == [default]


def test_an_inheriting_groups_locations_cannot_be_changed_by_a_forged_form(
    client: TestClient, admin: Admin, sales: dict[str, Any]
) -> None:
    east = admin.group("East", sales["id"])
    before = locations(admin, sales)
    csrf = signed_in(client, ADMIN_KEY)

    answer = client.post(
        f"/console/groups/{east['id']}/locations",
        data={"csrf_token": csrf, "name": "Home", "conditions": "[]"},
    )

    assert answer.status_code == 409 and "inherits" in (page_message(answer.text) or "")
    assert locations(admin, sales) == before == locations(admin, east)
