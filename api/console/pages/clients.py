"""**Clients**: the group tree, a group's clients kept live while a change converges, and "Update policy
now" per client and for the group."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlmodel import Session

from api.console.deps import ChangeDep, FormDep, OperatorDep
from api.console.forms import Fields
from api.console.group_view import group_context, selected_group
from api.console.pages.group_policies import policies_context
from api.console.rendering import SECURITY_HEADERS, render
from api.console.sessions import Operator
from api.deps import FabricDep, SessionDep
from api.errors import Conflict
from api.fabric import Fabric
from api.params import RowId
from api.services import agents, convergence, groups, locations
from manager_db.models import Group, as_utc, utcnow

router = APIRouter(prefix="/console")
CLIENTS_SHOWN = 1000
"""A group's clients list shows this many; the admin API pages through the rest."""
Tab = Literal["clients", "policies"]
RECENT_CHANGES = 5
"""How many of the latest changes the Clients tab shows with how far each has reached."""


@dataclass(frozen=True)
class ClientRow:
    id: str
    hostname: str
    online: bool
    mode: str
    location: str
    serial: int
    current_serial: int | None
    last_heartbeat: datetime | None

    @property
    def out_of_date(self) -> bool:
        return self.current_serial is None or self.serial < self.current_serial


def client_rows(session: Session, fabric: Fabric, *, group_id: int) -> tuple[list[ClientRow], int]:
    """The group's clients (not revoked), and how many it has in all."""
    found = [
        agent
        for agent in agents.list_agents(session, group_id=group_id, limit=CLIENTS_SHOWN, offset=0)
        if agent.revoked_at is None
    ]
    serials = agents.current_serials(session, found)
    names = {loc.id: loc.name for loc in locations.list_locations(session, group_id=group_id)}
    now = utcnow()
    rows = []
    for agent in found:
        rows.append(
            ClientRow(
                id=agent.id,
                hostname=agent.hostname,
                online=fabric.agent_online(agent, now=now),
                mode=agent.mode,
                location=names.get(agent.location_id or -1, "Default"),
                serial=agent.serial,
                current_serial=serials[agent.id],
                last_heartbeat=as_utc(agent.last_seen),
            )
        )
    total = agents.count_agents(session, group_id=group_id)
    return rows, total


@router.get("/clients", include_in_schema=False)
def clients_page(
    request: Request,
    operator: OperatorDep,
    session: SessionDep,
    fabric: FabricDep,
    group: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    tab: Tab = "clients",
) -> Response:
    selected = selected_group(session, group)
    context = {"operator": operator, "tab": tab, **group_context(session, fabric, selected)}
    if tab == "policies":
        context.update(policies_context(session, selected))
    else:
        rows, total = client_rows(session, fabric, group_id=selected.id or 0)
        context.update(
            clients=rows, total=total, changes=convergence.recent_changes(session, limit=RECENT_CHANGES)
        )
    return render(request, "clients.html", context)


@router.get("/groups/{group_id}/clients-table", include_in_schema=False)
def clients_table(
    request: Request, group_id: RowId, operator: OperatorDep, session: SessionDep, fabric: FabricDep
) -> Response:
    """The live part of the clients list: htmx asks for it every few seconds."""
    group = groups.get_group(session, group_id=group_id)
    rows, total = client_rows(session, fabric, group_id=group_id)
    changes = convergence.recent_changes(session, limit=RECENT_CHANGES)
    context = {"operator": operator, "group": group, "clients": rows, "total": total, "changes": changes}
    return render(request, "_clients_table.html", context)


@router.post("/groups/{group_id}/subgroups", include_in_schema=False)
def add_group(
    request: Request,
    group_id: RowId,
    form: FormDep,
    change: ChangeDep,
    operator: OperatorDep,
    session: SessionDep,
    fabric: FabricDep,
) -> Response:
    """Add Group: a subgroup of the selected one, inheriting from it (SEPM's default)."""
    parent = groups.get_group(session, group_id=group_id)
    fields = Fields(form)
    name = fields.name("name")
    if name is None:
        return _with_group_error(request, operator, session, fabric, parent, fields)
    try:
        made = groups.create_group(change, name=name, parent_id=group_id)
    except Conflict as clash:
        fields.refuse("name", clash.detail)
        return _with_group_error(request, operator, session, fabric, parent, fields, status_code=409)
    change.commit()
    return RedirectResponse(f"/console/clients?group={made.id}", status_code=303, headers=SECURITY_HEADERS)


def _with_group_error(
    request: Request,
    operator: Operator,
    session: Session,
    fabric: Fabric,
    parent: Group,
    fields: Fields,
    *,
    status_code: int = 422,
) -> Response:
    """The Clients page again, the name typed kept and the reason shown at its field."""
    session.rollback()
    rows, total = client_rows(session, fabric, group_id=parent.id or 0)
    context = {
        "operator": operator,
        "tab": "clients",
        **group_context(session, fabric, parent),
        "clients": rows,
        "total": total,
        "changes": convergence.recent_changes(session, limit=RECENT_CHANGES),
        "new_group": fields.values.get("name", ""),
        "new_group_error": fields.errors.get("name"),
    }
    return render(request, "clients.html", context, status_code=status_code)


@router.post("/agents/{agent_id}/update-now", include_in_schema=False)
def update_agent_now(request: Request, agent_id: str, change: ChangeDep) -> Response:
    agent = agents.request_update(change, agent_id=agent_id)
    change.commit()
    message = f"Update policy now: {agent.hostname} was asked to update."
    return render(request, "_message.html", {"level": "info", "message": message})


@router.post("/groups/{group_id}/update-now", include_in_schema=False)
def update_group_now(request: Request, group_id: RowId, change: ChangeDep) -> Response:
    asked = agents.request_group_update(change, group_id=group_id)
    change.commit()
    message = f"Update policy now: {len(asked)} client(s) were asked to update."
    return render(request, "_message.html", {"level": "info", "message": message})
