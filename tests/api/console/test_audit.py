"""The console's Audit page, in-process: who changed what (at, actor, action, target, detail), newest
first, filtered by actor and action, paged; a refused filter shown at its field. Read-only."""

from __future__ import annotations

import re
from html import unescape

import pytest
from fastapi.testclient import TestClient

from tests.support.clients import ADMIN_KEY, Admin
from tests.support.console import field_error, signed_in, write_controls


def actions(html: str) -> list[tuple[str, str, str]]:
    """(actor, action, target) of each row of the trail, top to bottom."""
    table = html[html.index('aria-label="Audit trail"') :]
    rows = re.findall(
        r"<tr>\s*<td>[^<]*</td>\s*<td>([^<]*)</td>\s*<td>([^<]*)</td>\s*<td>([^<]*)</td>", table
    )
    return [(unescape(a), unescape(b), unescape(c)) for a, b, c in rows]


@pytest.fixture
def changes(admin: Admin) -> dict[str, int]:
    """A viewer key, two policies and an edit: four changes, the bootstrap key's."""
    admin.post("/api-keys", {"name": "auditor", "role": "viewer"})
    one = admin.policy("One", "firewall", {"rules": ["x" * 200]})
    admin.policy("Two", "antivirus", {})
    admin.put(f"/policies/{one['id']}", {"body": {}})
    return {"one": one["id"]}


@pytest.mark.parametrize("role", ["admin", "viewer"])
def test_the_trail_is_shown_newest_first(
    client: TestClient, admin: Admin, changes: dict[str, int], role: str
) -> None:
    key = (
        ADMIN_KEY if role == "admin" else admin.post("/api-keys", {"name": "reader", "role": "viewer"})["key"]
    )
    signed_in(client, key)

    page = client.get("/console/audit")

    assert page.status_code == 200
    assert 'href="/console/audit" aria-current="page"' in page.text
    expected = [
        ("bootstrap", "policy.update", f"policy:{changes['one']}"),
        ("bootstrap", "policy.create", "policy:2"),
        ("bootstrap", "policy.create", f"policy:{changes['one']}"),
        ("bootstrap", "api_key.create", "api_key:1"),
    ]
    if role == "viewer":  # the viewer's own key is the newest change
        expected.insert(0, ("bootstrap", "api_key.create", "api_key:2"))
    shown = actions(page.text)
    assert shown[: len(expected)] == expected
    # Before them, what the manager did at its first start (the root group, trusting its CA).
    assert ("system", "group.create", "group:1") in shown[len(expected) :]
    assert {actor for actor, _, _ in shown[len(expected) :]} == {"system"}
    assert "<code>{&#34;version&#34;: 2}</code>" in page.text  # a detail as one line of JSON
    for label in ("Actor", "Action", "Entries per page"):
        assert f">{label}</label>" in page.text
    assert '<option value="policy.create"></option>' in page.text  # the actions the trail holds
    assert write_controls(page.text) == []


def test_filters_by_actor_and_action(client: TestClient, admin: Admin, changes: dict[str, int]) -> None:
    ops = admin.post("/api-keys", {"name": "ops", "role": "admin"})
    Admin(client, ops["key"]).policy("Three", "liveupdate", {})
    signed_in(client, ADMIN_KEY)

    by_action = client.get("/console/audit", params={"action": "policy.create"})
    by_actor = client.get("/console/audit", params={"actor": f"key:{ops['id']}:ops"})
    both = client.get("/console/audit", params={"actor": "bootstrap", "action": "policy.update"})
    none = client.get("/console/audit", params={"actor": "nobody"})

    assert [row[2] for row in actions(by_action.text)] == ["policy:3", "policy:2", f"policy:{changes['one']}"]
    assert actions(by_actor.text) == [(f"key:{ops['id']}:ops", "policy.create", "policy:3")]
    assert actions(both.text) == [("bootstrap", "policy.update", f"policy:{changes['one']}")]
    assert actions(none.text) == [] and "No audit entries match." in none.text
    assert 'value="policy.create"' in by_action.text  # the filter stays in its field


def test_pages_go_back_and_forth_keeping_the_filters(client: TestClient, changes: dict[str, int]) -> None:
    signed_in(client, ADMIN_KEY)

    first = client.get("/console/audit", params={"limit": 2, "actor": "bootstrap"})
    assert len(actions(first.text)) == 2 and "Previous</a>" not in first.text
    assert 'href="/console/audit?actor=bootstrap&amp;limit=2&amp;offset=2" rel="next">Next</a>' in first.text
    second = client.get("/console/audit", params={"limit": 2, "actor": "bootstrap", "offset": 2})
    assert len(actions(second.text)) == 2
    assert (
        'href="/console/audit?actor=bootstrap&amp;limit=2&amp;offset=0" rel="prev">Previous</a>'
        in second.text
    )
    assert "Next</a>" not in second.text  # four changes in all
    assert set(actions(first.text)).isdisjoint(actions(second.text))


@pytest.mark.parametrize(
    ("filters", "field", "reason"),
    [
        ({"limit": "201"}, "audit-limit", "from 1 to 200"),
        ({"limit": "two"}, "audit-limit", "whole number"),
        ({"actor": "x" * 129}, "audit-actor", "longer than 128"),
        ({"action": "a\x00"}, "audit-action", "NUL"),
    ],
)
def test_a_refused_filter_is_shown_at_its_field(
    client: TestClient, changes: dict[str, int], filters: dict[str, str], field: str, reason: str
) -> None:
    signed_in(client, ADMIN_KEY)
    page = client.get("/console/audit", params=filters)
    assert page.status_code == 422
    assert reason in (field_error(page.text, field) or "")
    assert actions(page.text) == []


def test_an_impossible_offset_is_refused_and_nothing_is_written(
    client: TestClient, admin: Admin, changes: dict[str, int]
) -> None:
    csrf = signed_in(client, ADMIN_KEY)
    page = client.get("/console/audit", params={"offset": str(2**70)})
    assert page.status_code == 422 and "Offset must be a whole number" in page.text
    assert client.post("/console/audit", data={"csrf_token": csrf}).status_code == 405


def test_a_long_detail_is_collapsed(client: TestClient, admin: Admin) -> None:
    root = admin.root()["id"]
    default = admin.default_location(root)
    conditions = [{"type": "fact", "name": "site", "equals": "x" * 150, "weight": 1}]
    admin.patch(f"/groups/{root}/locations/{default['id']}", {"conditions": conditions})
    signed_in(client, ADMIN_KEY)

    page = client.get("/console/audit", params={"action": "location.update"})

    found = re.search(
        r"<details><summary><code>([^<]*)</code></summary><pre>([^<]*)</pre></details>", page.text
    )
    assert found, page.text
    assert found.group(1).endswith("…") and len(unescape(found.group(1))) == 101
    assert "&#34;equals&#34;: &#34;" + "x" * 150 in found.group(2)  # all of it, indented
