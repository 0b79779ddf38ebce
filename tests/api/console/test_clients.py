"""The Clients page in-process: the group tree with Add Group, the clients list with what the operator
must see of each client, "Update policy now", and the recent changes with how far each reached."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient

from tests.support.clients import ADMIN_KEY, Admin, AgentClient
from tests.support.console import signed_in

HTMX = {"HX-Request": "true"}


def test_add_group_makes_an_inheriting_subgroup_of_the_selected_one(client: TestClient, admin: Admin) -> None:
    csrf = signed_in(client, ADMIN_KEY)
    root = int(admin.root()["id"])
    answer = client.post(
        f"/console/groups/{root}/subgroups",
        data={"csrf_token": csrf, "name": " Laptops "},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    (made,) = [g for g in admin.get("/groups") if g["name"] == "Laptops"]
    assert made["parent_id"] == root and made["inherit"] is True
    assert answer.headers["location"] == f"/console/clients?group={made['id']}"
    page = client.get(answer.headers["location"])
    assert '<h1 id="group-title">Laptops</h1>' in page.text


def test_a_refused_group_name_is_shown_at_its_field_and_makes_nothing(
    client: TestClient, admin: Admin
) -> None:
    csrf = signed_in(client, ADMIN_KEY)
    root = int(admin.root()["id"])
    admin.group("Servers", root)
    before = admin.get("/groups")
    for name, status, reason in (("", 422, "Name:"), ("Servers", 409, "Servers"), ("a\x07b", 422, "Name:")):
        answer = client.post(f"/console/groups/{root}/subgroups", data={"csrf_token": csrf, "name": name})
        assert answer.status_code == status, name
        assert 'id="new-group" name="name"' in answer.text and 'aria-invalid="true"' in answer.text
        assert reason in answer.text.split('id="new-group-error"')[1].split("</p>")[0]
    assert admin.get("/groups") == before


def test_the_clients_list_shows_each_client_with_its_serial_against_the_current_one(
    client: TestClient, admin: Admin, enroll: Callable[..., AgentClient]
) -> None:
    signed_in(client, ADMIN_KEY)
    root = int(admin.root()["id"])
    enroll(hostname="front-desk")
    current = admin.effective(root)["serial"]
    table = client.get(f"/console/groups/{root}/clients-table", headers=HTMX)
    assert table.status_code == 200
    row = table.text.split('<th scope="row">front-desk</th>')[1].split("</tr>")[0]
    assert f"0 / {current}" in row and '<td class="stale">Yes</td>' in row and "Pull" in row
    assert "Recent changes" in table.text


def test_update_policy_now_for_a_client_and_for_the_group_asks_them(
    client: TestClient, admin: Admin, enroll: Callable[..., AgentClient]
) -> None:
    csrf = signed_in(client, ADMIN_KEY)
    root = int(admin.root()["id"])
    agent = enroll(hostname="kiosk")
    one = client.post(f"/console/agents/{agent.id}/update-now", data={"csrf_token": csrf}, headers=HTMX)
    assert one.status_code == 200 and "kiosk was asked to update" in one.text
    group = client.post(f"/console/groups/{root}/update-now", data={"csrf_token": csrf}, headers=HTMX)
    assert group.status_code == 200 and "1 client(s) were asked to update" in group.text
    forged = client.post(f"/console/groups/{root}/update-now", data={}, headers=HTMX)
    assert forged.status_code == 403
