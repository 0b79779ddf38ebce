"""/agent/v1/heartbeat and /agent/v1/config: the route door of the heartbeat, and the config fetch.

The everyday heartbeat is answered before this route by `api.heartbeat.fast_path`; the route handles
everything else: unknown or uncached secrets, revoked agents, log uploads, pending "update now"
requests, and every request the fast path is not sure about. Both write their answer with
`api.heartbeat.answer.answer_heartbeat`; the route also documents the body in the OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session

from api.agent_auth import authenticate_agent, document_for_agent
from api.errors import PayloadTooLarge
from api.etags import none_match
from api.fabric import Fabric
from api.heartbeat.answer import answer_heartbeat
from api.heartbeat.checks import require_storable
from api.heartbeat.view import KnownAgent
from api.openapi import errors, not_modified
from api.params import ReportedLocation
from api.services import logs
from fabric_core.wire import Envelope, HeartbeatRequest, HeartbeatResponse

router = APIRouter(prefix="/agent/v1", tags=["agent"])
JSON = "application/json"


@router.post(
    "/heartbeat",
    response_class=Response,
    responses={
        200: {"model": HeartbeatResponse, "description": "unchanged, or the new signed document"},
        **errors(413, 503),
    },
)
async def heartbeat(body: HeartbeatRequest, request: Request) -> Response:
    """Report what the agent holds; learn whether its document changed and when to come back.

    `status` may be left out when it has not changed since the last heartbeat answered 2xx: the manager
    then keeps the status it holds. Served from memory: no database write unless the request carries a
    log batch.
    """
    # Not `FabricDep`: FastAPI runs a plain-function dependency in the thread pool, a thread hop that
    # cost more than the whole heartbeat.
    fabric: Fabric = request.app.state.fabric
    secret_hash, agent = await authenticate_agent(request, fabric)
    require_storable(body)
    found = await document_for_agent(fabric, agent, body.location_id)
    if body.logs is not None:
        if len(body.logs.entries) > fabric.settings.max_log_entries:
            raise PayloadTooLarge(
                f"log batch holds {len(body.logs.entries)} entries; "
                f"the limit is {fabric.settings.max_log_entries}"
            )
        await run_in_threadpool(_store_logs, fabric, agent, body)
    payload = answer_heartbeat(
        fabric,
        agent,
        secret_hash=secret_hash,
        serial=body.serial,
        mode=body.mode,
        status=body.status,
        found=found,
        mqtt_expires_at=body.mqtt_expires_at,
    )
    return Response(payload, media_type=JSON)


def _store_logs(fabric: Fabric, agent: KnownAgent, body: HeartbeatRequest) -> None:
    assert body.logs is not None
    with Session(fabric.engine) as session:
        logs.store_log_batch(session, agent_id=agent.id, group_id=agent.group_id, batch=body.logs)


@router.get(
    "/config",
    response_class=Response,
    responses={
        200: {"model": Envelope, "description": "the signed envelope, with an ETag"},
        **not_modified(),
        **errors(503),
    },
)
async def config(
    request: Request,
    location_id: ReportedLocation = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The current signed document of the agent's group and location (its Default when not given)."""
    fabric: Fabric = request.app.state.fabric  # not FabricDep: no thread hop (see `heartbeat`)
    _, agent = await authenticate_agent(request, fabric)
    _, document = await document_for_agent(fabric, agent, location_id)
    etag = f'"{document.serial}"'
    if none_match(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    return Response(document.envelope, media_type=JSON, headers={"ETag": etag})
