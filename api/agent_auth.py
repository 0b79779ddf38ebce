"""Who is calling the agent API: the agent secret, looked up in the heartbeat's in-memory view."""

from __future__ import annotations

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from api.errors import Forbidden, ServiceUnavailable, Unauthorized
from api.fabric import Fabric
from api.heartbeat.view import CachedDocument, KnownAgent
from api.security import bearer_token, hash_secret


async def authenticate_agent(request: Request, fabric: Fabric) -> tuple[str, KnownAgent]:
    """(secret hash, agent) of the caller; 401 for no or an unknown secret, 403 for a revoked agent."""
    secret = bearer_token(request.headers.get("authorization"))
    if secret is None:
        raise Unauthorized("missing agent secret: send Authorization: Bearer <secret>")
    secret_hash = hash_secret(secret)
    agent = fabric.view.cached_agent(secret_hash) or await run_in_threadpool(
        fabric.view.load_agent, secret_hash
    )
    if agent is None:
        raise Unauthorized("unknown agent secret")
    if agent.revoked:
        raise Forbidden(f"agent {agent.id} has been revoked")
    return secret_hash, agent


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
