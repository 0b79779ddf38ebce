"""The console's Policies page, in-process: the list by type with the groups using each policy, Add a
policy, Edit the policy (JSON checked at the field), Delete the policy (refused while in use); viewers
read only; every write CSRF-checked and read back through the admin API."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.clients import ADMIN_KEY, Admin
from tests.support.console import field_error, page_message, signed_in, write_controls


def viewer_key(admin: Admin) -> str:
    return str(admin.post("/api-keys", {"name": "auditor", "role": "viewer"})["key"])


@pytest.fixture
def firewall(admin: Admin) -> dict[str, Any]:
    return admin.policy("Office firewall", "firewall", {"rules": [{"port": 22, "action": "deny"}]})


def test_the_list_shows_policies_by_type_with_the_groups_using_them(
    client: TestClient, admin: Admin, firewall: dict[str, Any]
) -> None:
    sales = admin.group("Sales", admin.root()["id"], inherit=False)
    admin.assign(sales["id"], firewall)
    admin.policy("Daily updates", "liveupdate", {"schedule": "daily"})
    signed_in(client, ADMIN_KEY)

    page = client.get("/console/policies")

    assert page.status_code == 200
    assert (
        '<nav aria-label="Console"' in page.text
        and 'href="/console/policies" aria-current="page"' in page.text
    )
    assert page.text.index("<caption>firewall</caption>") < page.text.index("<caption>liveupdate</caption>")
    assert f'href="/console/policies/{firewall["id"]}">Office firewall</a>' in page.text
    assert f'href="/console/clients?group={sales["id"]}&amp;tab=policies">Sales</a>' in page.text
    assert "(not assigned)" in page.text  # Daily updates
    for label in ("Policy name", "Policy type", "Policy body (JSON object)"):
        assert f">{label}</label>" in page.text
    assert "Add Policy</button>" in page.text


def test_a_viewer_reads_the_policies_and_has_no_control_to_change_them(
    client: TestClient, admin: Admin, firewall: dict[str, Any]
) -> None:
    signed_in(client, viewer_key(admin))

    listing = client.get("/console/policies")
    policy = client.get(f"/console/policies/{firewall['id']}")

    assert listing.status_code == 200 and "Office firewall" in listing.text
    assert policy.status_code == 200 and "&#34;port&#34;: 22" in policy.text  # the body, read-only
    assert write_controls(listing.text) == []
    assert write_controls(policy.text) == []


def test_a_viewers_forged_writes_are_refused_and_change_nothing(
    client: TestClient, admin: Admin, firewall: dict[str, Any]
) -> None:
    csrf = signed_in(client, viewer_key(admin))
    path = f"/console/policies/{firewall['id']}"

    added = client.post(
        "/console/policies", data={"csrf_token": csrf, "name": "x", "type": "x", "body": "{}"}
    )
    edited = client.post(path, data={"csrf_token": csrf, "name": "Renamed", "body": "{}"})
    deleted = client.post(f"{path}/delete", data={"csrf_token": csrf})

    assert [added.status_code, edited.status_code, deleted.status_code] == [403, 403, 403]
    assert "viewer" in (page_message(edited.text) or "")
    assert admin.get("/policies") == [{**firewall}]


@pytest.mark.parametrize("token", [None, "not-the-token"])
def test_a_write_without_the_sessions_csrf_token_is_refused(
    client: TestClient, admin: Admin, firewall: dict[str, Any], token: str | None
) -> None:
    signed_in(client, ADMIN_KEY)
    csrf = {} if token is None else {"csrf_token": token}
    path = f"/console/policies/{firewall['id']}"

    answers = [
        client.post("/console/policies", data={**csrf, "name": "New", "type": "antivirus", "body": "{}"}),
        client.post(path, data={**csrf, "name": "Renamed", "body": '{"rules": []}'}),
        client.post(f"{path}/delete", data=csrf),
    ]

    assert [answer.status_code for answer in answers] == [403, 403, 403]
    assert "CSRF" in (page_message(answers[0].text) or "")
    assert admin.get("/policies") == [firewall]


def test_add_a_policy(client: TestClient, admin: Admin) -> None:
    csrf = signed_in(client, ADMIN_KEY)

    answer = client.post(
        "/console/policies",
        data={
            "csrf_token": csrf,
            "name": "  Scan nightly ",
            "type": "antivirus",
            "body": '{"scan": "nightly"}',
        },
        follow_redirects=False,
    )

    assert answer.status_code == 303 and answer.headers["location"] == "/console/policies?done=created"
    [made] = admin.get("/policies")
    assert (made["name"], made["type"], made["version"], made["body"]) == (
        "Scan nightly",  # trimmed, as the admin API trims it
        "antivirus",
        1,
        {"scan": "nightly"},
    )
    assert page_message(client.get(answer.headers["location"]).text) == "Policy added."


def test_edit_a_policy_gives_it_a_new_version_and_every_user_a_new_document(
    client: TestClient, admin: Admin, firewall: dict[str, Any]
) -> None:
    root = admin.root()["id"]
    admin.assign(root, firewall)
    before = admin.effective(root)["serial"]
    csrf = signed_in(client, ADMIN_KEY)
    page = client.get(f"/console/policies/{firewall['id']}")
    assert "Save Policy</button>" in page.text and "Delete Policy</button>" in page.text

    answer = client.post(
        f"/console/policies/{firewall['id']}",
        data={"csrf_token": csrf, "name": "Branch firewall", "body": '{\n  "rules": []\n}'},
    )

    assert answer.status_code == 200 and answer.url.path == f"/console/policies/{firewall['id']}"
    assert page_message(answer.text) == "Policy saved."
    policy = admin.get(f"/policies/{firewall['id']}")
    assert (policy["name"], policy["version"], policy["body"]) == ("Branch firewall", 2, {"rules": []})
    document = admin.effective(root)
    assert document["serial"] > before
    assert document["policies"]["firewall"]["body"] == {"rules": []}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('{"rules": [1, 2,]}', "is not valid JSON: Expecting value at line 1, column 17"),
        ('{\n  "rules": [\n    {"port": 22\n  ]\n}', "at line 4, column 3"),
        ("[1, 2]", "must be a JSON object, not an array"),
        ('"just text"', "must be a JSON object, not a string"),
        ('{"limit": NaN}', "NaN is not a JSON number"),
        ("", "is empty"),
        ('{"big": 1180591620717411303424}', "plain JSON"),  # 2**70: the service's refusal
    ],
)
def test_a_body_that_is_not_a_plain_json_object_is_refused_at_the_field(
    client: TestClient, admin: Admin, firewall: dict[str, Any], body: str, reason: str
) -> None:
    csrf = signed_in(client, ADMIN_KEY)

    answer = client.post(
        f"/console/policies/{firewall['id']}", data={"csrf_token": csrf, "name": "Renamed", "body": body}
    )

    assert answer.status_code == 422
    assert reason in (field_error(answer.text, "policy-body") or "")
    assert field_error(answer.text, "policy-name") is None
    assert f">{body}</textarea>" in answer.text.replace("&#34;", '"')  # what was typed is kept
    assert admin.get(f"/policies/{firewall['id']}") == firewall  # neither the name nor the body changed


def test_a_name_taken_by_another_policy_is_refused_at_the_name(
    client: TestClient, admin: Admin, firewall: dict[str, Any]
) -> None:
    other = admin.policy("Strict firewall", "firewall", {})
    csrf = signed_in(client, ADMIN_KEY)

    edited = client.post(
        f"/console/policies/{other['id']}",
        data={"csrf_token": csrf, "name": "Office firewall", "body": '{"changed": true}'},
    )
    added = client.post(
        "/console/policies",
        data={"csrf_token": csrf, "name": "Office firewall", "type": "firewall", "body": "{}"},
    )

    assert edited.status_code == 409 and added.status_code == 409
    assert "already exists" in (field_error(edited.text, "policy-name") or "")
    assert "already exists" in (field_error(added.text, "policy-name") or "")
    assert admin.get("/policies") == [firewall, other]


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"type": "Fire Wall"}, "policy-type", "lowercase letters"),
        ({"type": ""}, "policy-type", "lowercase letters"),
        ({"name": ""}, "policy-name", "at least 1 character"),
        ({"name": "two\nlines"}, "policy-name", "control characters"),
        ({"name": "x" * 129}, "policy-name", "at most 128 characters"),
        ({"body": "{"}, "policy-body", "line 1, column 2"),
    ],
)
def test_a_refused_new_policy_is_shown_at_its_field_and_not_added(
    client: TestClient, admin: Admin, fields: dict[str, str], field: str, reason: str
) -> None:
    csrf = signed_in(client, ADMIN_KEY)
    form = {"csrf_token": csrf, "name": "New", "type": "antivirus", "body": "{}", **fields}

    answer = client.post("/console/policies", data=form)

    assert answer.status_code == 422
    assert reason in (field_error(answer.text, field) or "")
    assert admin.get("/policies") == []


def test_delete_a_policy_no_group_uses(client: TestClient, admin: Admin, firewall: dict[str, Any]) -> None:
    csrf = signed_in(client, ADMIN_KEY)

    answer = client.post(f"/console/policies/{firewall['id']}/delete", data={"csrf_token": csrf})

    assert answer.status_code == 200 and page_message(answer.text) == "Policy deleted."
    assert admin.get("/policies") == []
    assert admin.get(f"/policies/{firewall['id']}", expect=404)


def test_a_policy_in_use_is_not_deleted_and_the_page_says_who_uses_it(
    client: TestClient, admin: Admin, firewall: dict[str, Any]
) -> None:
    sales = admin.group("Sales", admin.root()["id"], inherit=False)
    admin.assign(sales["id"], firewall)
    csrf = signed_in(client, ADMIN_KEY)

    answer = client.post(f"/console/policies/{firewall['id']}/delete", data={"csrf_token": csrf})

    assert answer.status_code == 409
    assert answer.headers["content-type"].startswith("text/html")
    assert page_message(answer.text) == (
        'Policy "Office firewall" cannot be deleted: it is assigned to "Sales". Unassign it first.'
    )
    assert admin.get("/policies") == [firewall]


@pytest.mark.parametrize(
    ("path", "status"), [("/console/policies/999", 404), (f"/console/policies/{2**64}", 422)]
)
def test_an_unknown_or_impossible_policy_id_is_an_error_page(
    client: TestClient, path: str, status: int
) -> None:
    csrf = signed_in(client, ADMIN_KEY)

    shown = client.get(path)
    posted = client.post(path, data={"csrf_token": csrf, "name": "x", "body": "{}"})

    assert shown.status_code == status and posted.status_code == status
    assert shown.headers["content-type"].startswith("text/html") and 'role="alert"' in shown.text
