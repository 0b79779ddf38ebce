"""Who is calling the agent API: the agent secret, looked up in the heartbeat's in-memory view."""

from __future__ import annotations

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from api.credentials import AGENT, agent_caller
from api.errors import ServiceUnavailable
from api.fabric import Fabric
from api.heartbeat.view import CachedDocument, KnownAgent


async def authenticate_agent(request: Request, fabric: Fabric) -> tuple[str, KnownAgent]:
    """(secret hash, agent) of the caller; 401 for no or an unknown secret, 403 for a revoked agent.

    Found by the `api.credentials.Credentials` layer before the body was read, or checked here."""
    found = request.scope.get(AGENT)
    if found is not None:
        secret_hash, agent = found
        return secret_hash, agent
    return await agent_caller(fabric, request.headers.get("authorization"))


async def document_for_agent(
    fabric: Fabric, agent: KnownAgent, location_id: int | None
) -> tuple[int, CachedDocument]:
    """The (location, document) the agent gets: its location's, or its group's Default."""
    found = fabric.view.document_for(agent.group_id, location_id)
    if found is None:  # a group made by another process in the last instant: look again once
        await run_in_threadpool(fabric.view.refresh)
        found = fabric.view.document_for(agent.group_id, location_id)
    if found is None:
        raise ServiceUnavailable(f"no document for group {agent.group_id} yet; retry shortly")
    return found
