"""`api.services.audit`: the audit trail newest first, filtered by actor and action, paged; and the
actors and actions it holds, for the console's filters. On both backends, with changes made through the
admin API as operators make them."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session

from api.errors import Invalid
from api.services import audit
from tests.support.clients import Admin


def engine(client: TestClient) -> Engine:
    found: Engine = client.app.state.fabric.engine  # type: ignore[attr-defined]
    return found


def test_the_trail_is_newest_first_and_filters_by_actor_and_action(client: TestClient, admin: Admin) -> None:
    other = Admin(client, admin.post("/api-keys", {"name": "ops", "role": "admin"})["key"])
    first = admin.policy("One", "firewall", {})
    other.policy("Two", "firewall", {})
    admin.put(f"/policies/{first['id']}", {"body": {"changed": True}})

    with Session(engine(client)) as session:
        every = audit.list_audit(session)
        assert [(e.actor, e.action) for e in every[:4]] == [
            ("bootstrap", "policy.update"),
            ("key:1:ops", "policy.create"),
            ("bootstrap", "policy.create"),
            ("bootstrap", "api_key.create"),
        ]
        assert [e.target for e in audit.list_audit(session, action="policy.update")] == [
            f"policy:{first['id']}"
        ]
        assert [e.action for e in audit.list_audit(session, actor="key:1:ops")] == ["policy.create"]
        assert audit.list_audit(session, actor="bootstrap", action="policy.create")[0].detail["name"] == "One"
        assert audit.list_audit(session, actor="nobody") == []
        paged = [audit.list_audit(session, limit=2, offset=offset) for offset in (0, 2)]
        assert [e.id for page in paged for e in page] == [e.id for e in every[:4]]
        assert {"bootstrap", "key:1:ops"} <= set(audit.actors(session))
        assert {"policy.create", "policy.update", "api_key.create"} <= set(audit.actions(session))
        assert audit.actions(session) == sorted(audit.actions(session))


@pytest.mark.parametrize(("limit", "offset"), [(0, 0), (1001, 0), (10, -1)])
def test_a_page_out_of_bounds_is_refused(client: TestClient, limit: int, offset: int) -> None:
    with Session(engine(client)) as session, pytest.raises(Invalid):
        audit.list_audit(session, limit=limit, offset=offset)
