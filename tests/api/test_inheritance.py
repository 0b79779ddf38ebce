"""SEPM inheritance, resolution and serials, through the admin API on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from manager_db.models import OutboxEntry
from tests.support.clients import Admin

FIREWALL = {"rules": [{"allow": "tcp/443"}]}
ANTIVIRUS = {"scan": "daily"}


def outbox(admin: Admin) -> list[OutboxEntry]:
    with Session(admin.client.app.state.fabric.engine) as session:  # type: ignore[attr-defined]
        return list(session.exec(select(OutboxEntry).order_by(col(OutboxEntry.id))).all())


def policy_sources(doc: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """type -> (policy id, source group id)"""
    return {t: (p["id"], p["source_group_id"]) for t, p in doc["policies"].items()}


def test_new_group_inherits_parent_policies_locations_and_settings(admin: Admin) -> None:
    root = admin.root()
    firewall = admin.policy("fw", "firewall", FIREWALL)
    admin.put(f"/groups/{root['id']}/policies/firewall", {"policy_id": firewall["id"]})
    admin.put(f"/groups/{root['id']}/communication", {"mode": "pull", "heartbeat_s": 60})

    child = admin.group("Sales", root["id"])
    assert child["inherit"] is True
    doc = admin.effective(child["id"])

    assert doc["group_id"] == child["id"]
    assert policy_sources(doc) == {"firewall": (firewall["id"], root["id"])}
    assert doc["policies"]["firewall"]["body"] == FIREWALL
    assert doc["communication"]["mode"] == "pull" and doc["communication"]["heartbeat_s"] == 60
    assert [loc["id"] for loc in doc["locations"]] == [admin.default_location(root["id"])["id"]]
    assert admin.get(f"/groups/{child['id']}/locations")[0]["group_id"] == root["id"]


def test_root_change_fans_out_to_inheriting_descendants_only(admin: Admin) -> None:
    root = admin.root()
    child = admin.group("Sales", root["id"])
    grandchild = admin.group("EMEA", child["id"])
    standalone = admin.group("Servers", root["id"], inherit=False)
    before = {g["id"]: admin.effective(g["id"])["serial"] for g in (child, grandchild, standalone)}

    firewall = admin.policy("fw", "firewall", FIREWALL)
    admin.put(f"/groups/{root['id']}/policies/firewall", {"policy_id": firewall["id"]})

    for group in (child, grandchild):
        doc = admin.effective(group["id"])
        assert doc["serial"] > before[group["id"]]
        assert policy_sources(doc) == {"firewall": (firewall["id"], root["id"])}
    unchanged = admin.effective(standalone["id"])
    assert unchanged["serial"] == before[standalone["id"]]
    assert unchanged["policies"] == {}


def test_turning_inheritance_off_copies_the_parent_state(admin: Admin) -> None:
    root = admin.root()
    firewall = admin.policy("fw", "firewall", FIREWALL)
    admin.put(f"/groups/{root['id']}/policies/firewall", {"policy_id": firewall["id"]})
    office = admin.post(
        f"/groups/{root['id']}/locations",
        {"name": "Office", "conditions": [{"type": "ip_range", "cidr": "10.0.0.0/8", "weight": 5}]},
    )
    av = admin.policy("av", "antivirus", ANTIVIRUS)
    admin.put(f"/groups/{root['id']}/locations/{office['id']}/policies/antivirus", {"policy_id": av["id"]})
    admin.put(f"/groups/{root['id']}/communication", {"heartbeat_s": 120})
    child = admin.group("Sales", root["id"])

    admin.patch(f"/groups/{child['id']}", {"inherit": False})

    own = admin.get(f"/groups/{child['id']}/locations")
    assert [(loc["name"], loc["group_id"]) for loc in own] == [
        ("Default", child["id"]),
        ("Office", child["id"]),
    ]
    assert {loc["id"] for loc in own}.isdisjoint({office["id"], admin.default_location(root["id"])["id"]})
    assert own[1]["conditions"] == office["conditions"]
    office_copy = own[1]
    doc = admin.effective(child["id"], office_copy["id"])
    assert policy_sources(doc) == {
        "firewall": (firewall["id"], child["id"]),
        "antivirus": (av["id"], child["id"]),
    }
    assert doc["policies"]["antivirus"]["scope"] == "location"
    assert admin.get(f"/groups/{child['id']}/communication")["heartbeat_s"] == 120

    # The group owns its state now: the parent's next change does not reach it.
    serial = doc["serial"]
    admin.put(f"/policies/{firewall['id']}", {"body": {"rules": []}})
    assert admin.effective(root["id"])["policies"]["firewall"]["version"] == 2
    admin.delete(f"/groups/{root['id']}/policies/firewall")
    assert (
        admin.effective(child["id"], office_copy["id"])["policies"]["firewall"]["version"] == 2
    )  # shared policy
    assert "firewall" not in admin.effective(root["id"])["policies"]
    assert admin.effective(child["id"], office_copy["id"])["serial"] > serial


def test_turning_inheritance_back_on_discards_the_group_state(admin: Admin) -> None:
    root = admin.root()
    child = admin.group("Sales", root["id"], inherit=False)
    lab = admin.post(f"/groups/{child['id']}/locations", {"name": "Lab", "conditions": []})
    av = admin.policy("av", "antivirus", ANTIVIRUS)
    admin.put(f"/groups/{child['id']}/policies/antivirus", {"policy_id": av["id"]})
    admin.put(f"/groups/{child['id']}/communication", {"mode": "pull"})

    admin.patch(f"/groups/{child['id']}", {"inherit": True})

    locations = admin.get(f"/groups/{child['id']}/locations")
    assert [loc["group_id"] for loc in locations] == [root["id"]]
    admin.get(f"/groups/{child['id']}/locations/{lab['id']}", expect=404)
    doc = admin.effective(child["id"])
    assert doc["policies"] == {}
    assert doc["communication"]["mode"] == "push"
    # Turning it off again copies the parent's current state, not the discarded one.
    admin.patch(f"/groups/{child['id']}", {"inherit": False})
    assert [loc["name"] for loc in admin.get(f"/groups/{child['id']}/locations")] == ["Default"]
    assert admin.effective(child["id"])["policies"] == {}


def test_the_root_cannot_inherit(admin: Admin) -> None:
    root = admin.root()
    response = admin.patch(f"/groups/{root['id']}", {"inherit": True}, expect=409)
    assert "root" in response["detail"]
    assert admin.root()["inherit"] is False


def test_moving_a_group_re_resolves_its_whole_subtree(admin: Admin) -> None:
    root = admin.root()
    branch = admin.group("Branch", root["id"], inherit=False)
    av = admin.policy("av", "antivirus", ANTIVIRUS)
    admin.put(f"/groups/{branch['id']}/policies/antivirus", {"policy_id": av["id"]})
    sales = admin.group("Sales", root["id"])
    emea = admin.group("EMEA", sales["id"])
    assert admin.effective(emea["id"])["policies"] == {}

    admin.patch(f"/groups/{sales['id']}", {"parent_id": branch["id"]})

    for group in (sales, emea):
        doc = admin.effective(group["id"])
        assert policy_sources(doc) == {"antivirus": (av["id"], branch["id"])}
        assert [loc["id"] for loc in doc["locations"]] == [admin.default_location(branch["id"])["id"]]
    assert admin.get(f"/groups/{sales['id']}")["parent_id"] == branch["id"]


def test_editing_a_shared_policy_updates_every_group_that_uses_it(admin: Admin) -> None:
    root = admin.root()
    shared = admin.policy("fw", "firewall", FIREWALL)
    east = admin.group("East", root["id"], inherit=False)
    west = admin.group("West", root["id"], inherit=False)
    west_office = admin.post(f"/groups/{west['id']}/locations", {"name": "Office", "conditions": []})
    west_child = admin.group("West Lab", west["id"])
    other = admin.group("Other", root["id"], inherit=False)
    admin.put(f"/groups/{east['id']}/policies/firewall", {"policy_id": shared["id"]})
    admin.put(
        f"/groups/{west['id']}/locations/{west_office['id']}/policies/firewall", {"policy_id": shared["id"]}
    )
    other_serial = admin.effective(other["id"])["serial"]

    updated = admin.put(f"/policies/{shared['id']}", {"body": {"rules": [{"deny": "all"}]}})

    assert updated["version"] == 2
    for group_id, location_id in (
        (east["id"], None),
        (west["id"], west_office["id"]),
        (west_child["id"], west_office["id"]),
    ):
        entry = admin.effective(group_id, location_id)["policies"]["firewall"]
        assert (entry["version"], entry["body"]) == (2, {"rules": [{"deny": "all"}]})
    assert "firewall" not in admin.effective(west["id"])["policies"]  # West's Default has none
    assert admin.effective(other["id"])["serial"] == other_serial


def test_serials_move_only_when_a_document_really_changes(admin: Admin) -> None:
    root = admin.root()
    child = admin.group("Sales", root["id"])
    firewall = admin.policy("fw", "firewall", FIREWALL)
    admin.put(f"/groups/{root['id']}/policies/firewall", {"policy_id": firewall["id"]})
    serials = {g: admin.effective(g)["serial"] for g in (root["id"], child["id"])}
    queued = len(outbox(admin))

    # Nothing that reaches a document changes: same body, same settings, same assignment, a rename.
    assert admin.put(f"/policies/{firewall['id']}", {"body": FIREWALL})["version"] == 1
    admin.put(f"/groups/{root['id']}/communication", {"mode": "push", "heartbeat_s": 300})
    admin.put(f"/groups/{root['id']}/policies/firewall", {"policy_id": firewall["id"]})
    admin.patch(f"/groups/{child['id']}", {"name": "Sales and Marketing"})

    assert {g: admin.effective(g)["serial"] for g in serials} == serials
    assert len(outbox(admin)) == queued

    # A real change: one new serial per changed document, each with its outbox row, in serial order.
    admin.put(f"/groups/{root['id']}/communication", {"heartbeat_s": 600})
    after = {g: admin.effective(g)["serial"] for g in serials}
    assert all(after[g] > serials[g] for g in serials)
    assert len(set(after.values())) == 2
    rows = outbox(admin)[queued:]
    assert sorted((r.group_id, r.serial) for r in rows) == sorted(after.items())
    assert [r.serial for r in rows] == sorted(r.serial for r in rows)


def test_location_policies_and_settings_override_the_group_ones(admin: Admin) -> None:
    root = admin.root()
    strict = admin.policy("strict", "firewall", {"level": "strict"})
    relaxed = admin.policy("relaxed", "firewall", {"level": "relaxed"})
    office = admin.post(f"/groups/{root['id']}/locations", {"name": "Office", "conditions": []})
    admin.put(f"/groups/{root['id']}/policies/firewall", {"policy_id": strict["id"]})
    admin.put(
        f"/groups/{root['id']}/locations/{office['id']}/policies/firewall", {"policy_id": relaxed["id"]}
    )
    admin.put(
        f"/groups/{root['id']}/locations/{office['id']}/communication",
        {"use_group_settings": False, "mode": "pull", "heartbeat_s": 900},
    )

    at_office = admin.effective(root["id"], office["id"])
    elsewhere = admin.effective(root["id"])
    assert (at_office["policies"]["firewall"]["id"], at_office["policies"]["firewall"]["scope"]) == (
        relaxed["id"],
        "location",
    )
    assert (elsewhere["policies"]["firewall"]["id"], elsewhere["policies"]["firewall"]["scope"]) == (
        strict["id"],
        "group",
    )
    assert at_office["communication"]["mode"] == "pull" and at_office["communication"]["heartbeat_s"] == 900
    assert elsewhere["communication"]["mode"] == "push"
    view = admin.get(f"/groups/{root['id']}/locations/{office['id']}/communication")
    assert view["use_group_settings"] is False and view["effective"]["mode"] == "pull"

    # Back to the group's settings.
    admin.put(f"/groups/{root['id']}/locations/{office['id']}/communication", {"use_group_settings": True})
    assert admin.effective(root["id"], office["id"])["communication"]["mode"] == "push"


def test_every_change_leaves_an_audit_row_in_its_own_transaction(admin: Admin) -> None:
    from manager_db.models import AuditEntry

    root = admin.root()
    admin.group("Sales", root["id"])
    admin.post("/groups", {"name": "Sales", "parent_id": root["id"]}, expect=409)  # refused: no audit row
    with Session(admin.client.app.state.fabric.engine) as session:  # type: ignore[attr-defined]
        actions = [(a.actor, a.action) for a in session.exec(select(AuditEntry).order_by(col(AuditEntry.id)))]
    assert actions[-1] == ("bootstrap", "group.create")
    assert [a for _, a in actions].count("group.create") == 2  # the root, made by the system, and Sales
