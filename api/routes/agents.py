"""/api/v1/agents and enrolment tokens: the operator's view of the fleet."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, status

from api.deps import ChangeDep, FabricDep, SessionDep, ViewerDep
from api.openapi import errors
from api.params import GroupFilter, Limit, Offset, RowId
from api.schemas import AgentOut, AgentUpdate, LogOut, TokenCreate, TokenOut
from api.services import agents, groups, logs
from fabric_core.tls import join_token
from fabric_core.wire import LogLevel, Moment
from manager_db.models import Agent, LogRecord, as_utc, utcnow

router = APIRouter(tags=["agents"])


def _agent_out(agent: Agent, current_serial: int | None, fabric: FabricDep) -> AgentOut:
    last_seen = as_utc(agent.last_seen)
    online = fabric.agent_online(agent, now=utcnow())
    return AgentOut(
        id=agent.id,
        hostname=agent.hostname,
        group_id=agent.group_id,
        location_id=agent.location_id,
        mode=agent.mode,
        serial=agent.serial,
        current_serial=current_serial,
        up_to_date=current_serial is not None and agent.serial == current_serial,
        last_seen=last_seen,
        online=online,
        enrolled_at=as_utc(agent.enrolled_at) or utcnow(),
        revoked=agent.revoked_at is not None,
    )


def _log_out(record: LogRecord) -> LogOut:
    assert record.id is not None
    return LogOut(
        id=record.id,
        agent_id=record.agent_id,
        group_id=record.group_id,
        batch_id=record.batch_id,
        ts=as_utc(record.ts) or record.ts,
        received_at=as_utc(record.received_at) or record.received_at,
        level=record.level,
        category=record.category,
        message=record.message,
        data=record.data,
    )


@router.post(
    "/groups/{group_id}/enrollment-tokens",
    response_model=TokenOut,
    status_code=status.HTTP_201_CREATED,
    responses=errors(404),
)
def create_enrollment_token(
    group_id: RowId, body: TokenCreate, change: ChangeDep, fabric: FabricDep
) -> TokenOut:
    """A token that enrols agents into this group. Shown once; stored hashed."""
    token, row = agents.create_enrollment_token(
        change,
        group_id=group_id,
        expires_in_s=body.expires_in_s or fabric.settings.enrollment_token_ttl_s,
        max_uses=body.max_uses,
    )
    change.commit()
    assert row.id is not None
    ca = fabric.tls.ca_hash if fabric.tls is not None else None
    return TokenOut(
        token=token,
        id=row.id,
        group_id=group_id,
        expires_at=row.expires_at,
        max_uses=row.max_uses,
        ca_hash=ca,
        join_token=join_token(token, ca) if ca else token,
    )


@router.get("/agents", response_model=list[AgentOut])
def list_agents(
    session: SessionDep,
    fabric: FabricDep,
    _: ViewerDep,
    group_id: GroupFilter = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[AgentOut]:
    found = agents.list_agents(session, group_id=group_id, limit=limit, offset=offset)
    serials = agents.current_serials(session, found)
    return [_agent_out(agent, serials[agent.id], fabric) for agent in found]


@router.get("/agents/{agent_id}", response_model=AgentOut, responses=errors(404))
def get_agent(agent_id: str, session: SessionDep, fabric: FabricDep, _: ViewerDep) -> AgentOut:
    agent = agents.get_agent(session, agent_id=agent_id)
    return _agent_out(agent, agents.current_serials(session, [agent])[agent.id], fabric)


@router.patch("/agents/{agent_id}", response_model=AgentOut, responses=errors(404, 409))
def move_agent(agent_id: str, body: AgentUpdate, change: ChangeDep, fabric: FabricDep) -> AgentOut:
    """Move an agent to another group; it gets that group's document at its next heartbeat."""
    agent = agents.move_agent(change, agent_id=agent_id, group_id=body.group_id)
    serial = agents.current_serials(change.session, [agent])[agent.id]
    change.commit()
    return _agent_out(agent, serial, fabric)


@router.delete("/agents/{agent_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 409))
def revoke_agent(agent_id: str, change: ChangeDep) -> None:
    """Revoke an agent: its secret stops working at once. The record stays for the audit trail."""
    agents.revoke_agent(change, agent_id=agent_id)
    change.commit()


@router.post(
    "/agents/{agent_id}/update-now", status_code=status.HTTP_202_ACCEPTED, responses=errors(404, 409)
)
def update_now(agent_id: str, change: ChangeDep) -> dict[str, str]:
    """Ask the agent to fetch its configuration again; a pull agent does so at its next heartbeat."""
    agent = agents.request_update(change, agent_id=agent_id)
    change.commit()
    return {"agent_id": agent.id, "status": "requested"}


@router.post("/groups/{group_id}/update-now", status_code=status.HTTP_202_ACCEPTED, responses=errors(404))
def update_group_now(group_id: RowId, change: ChangeDep) -> dict[str, int | str]:
    """Update now for every agent of the group and its subgroups."""
    agents_asked = agents.request_group_update(change, group_id=group_id)
    change.commit()
    return {"group_id": group_id, "agents": len(agents_asked), "status": "requested"}


@dataclass
class LogFilters:
    """The query parameters both log listings take."""

    level: LogLevel | None = None
    since: Moment | None = None
    until: Moment | None = None
    limit: Limit = 100
    offset: Offset = 0


LogFiltersDep = Annotated[LogFilters, Depends()]


@router.get("/agents/{agent_id}/logs", response_model=list[LogOut], responses=errors(404))
def agent_logs(agent_id: str, session: SessionDep, _: ViewerDep, filters: LogFiltersDep) -> list[LogOut]:
    agents.get_agent(session, agent_id=agent_id)
    found = logs.query_logs(session, agent_id=agent_id, **asdict(filters))
    return [_log_out(record) for record in found]


@router.get("/groups/{group_id}/logs", response_model=list[LogOut], responses=errors(404))
def group_logs(group_id: RowId, session: SessionDep, _: ViewerDep, filters: LogFiltersDep) -> list[LogOut]:
    groups.get_group(session, group_id=group_id)
    found = logs.query_logs(session, group_id=group_id, **asdict(filters))
    return [_log_out(record) for record in found]
