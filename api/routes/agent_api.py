"""/agent/v1: what agents call. Enrolment, the heartbeat (the hot path) and the config fetch."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session

from api.deps import Fabric, FabricDep
from api.errors import Forbidden, Invalid, PayloadTooLarge, ServiceUnavailable, Unauthorized
from api.heartbeat import CachedDocument, KnownAgent, next_heartbeat_s
from api.schemas import is_plain_json
from api.security import bearer_token, hash_secret
from api.services import agents, logs
from api.services.change import Change
from broker_bridge.credentials import agent_password
from fabric_core.wire import (
    EnrollRequest,
    EnrollResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    MqttCredentials,
    SigningKeyInfo,
    heartbeat_response_bytes,
)

router = APIRouter(prefix="/agent/v1", tags=["agent"])
JSON = "application/json"


@router.post("/enroll", response_model=EnrollResponse)
def enroll(body: EnrollRequest, fabric: FabricDep) -> EnrollResponse:
    """Exchange an enrolment token for an agent id, a secret and the key that signs documents."""
    if "\x00" in body.hostname:
        raise Invalid("hostname may not contain NUL characters")
    if not is_plain_json(body.facts):
        raise Invalid(f"facts must be {PLAIN_JSON}")
    with Session(fabric.engine, expire_on_commit=False) as session:
        change = Change(session=session, actor="enrollment", signing_key=fabric.signing_key)
        enrolment = agents.enroll(change, token=body.token, hostname=body.hostname, facts=body.facts)
        change.commit()
    verify_key = fabric.signing_key.verify_key
    settings = fabric.settings
    mqtt = None
    if settings.mqtt_enabled:
        # The broker account appears within a bridge round (it provisions from the agents table);
        # until then the agent's connects are refused and it keeps converging by heartbeat.
        mqtt = MqttCredentials(
            url=settings.mqtt_public_address.url,
            username=enrolment.agent.id,
            password=agent_password(fabric.signing_key, enrolment.agent.id),
            prefix=settings.mqtt_prefix,
        )
    return EnrollResponse(
        agent_id=enrolment.agent.id,
        secret=enrolment.secret,
        group_id=enrolment.agent.group_id,
        signing_key=SigningKeyInfo(kid=verify_key.kid, public_key=verify_key.public_base64),
        mqtt=mqtt,
    )


async def authenticate_agent(request: Request, fabric: Fabric) -> tuple[str, KnownAgent]:
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


async def _document(fabric: Fabric, agent: KnownAgent, location_id: int | None) -> tuple[int, CachedDocument]:
    found = fabric.view.document_for(agent.group_id, location_id)
    if found is None:  # a group made by another process in the last instant: look again once
        await run_in_threadpool(fabric.view.refresh)
        found = fabric.view.document_for(agent.group_id, location_id)
    if found is None:
        raise ServiceUnavailable(f"no document for group {agent.group_id} yet; retry shortly")
    return found


@router.post(
    "/heartbeat",
    response_class=Response,
    responses={200: {"model": HeartbeatResponse, "description": "unchanged, or the new signed document"}},
)
async def heartbeat(body: HeartbeatRequest, request: Request, fabric: FabricDep) -> Response:
    """Report what the agent holds; learn whether its document changed and when to come back.

    Served from memory: no database write unless the request carries a log batch.
    """
    secret_hash, agent = await authenticate_agent(request, fabric)
    _require_storable(body)
    location_id, document = await _document(fabric, agent, body.location_id)
    if body.logs is not None:
        if len(body.logs.entries) > fabric.settings.max_log_entries:
            raise PayloadTooLarge(
                f"log batch holds {len(body.logs.entries)} entries; "
                f"the limit is {fabric.settings.max_log_entries}"
            )
        await run_in_threadpool(_store_logs, fabric, agent, body)
    changed = document.serial != body.serial or agent.update_requested
    if agent.update_requested:
        fabric.view.served_update(secret_hash)
    fabric.ledger.record(
        agent.id,
        serial=body.serial,
        location_id=location_id,
        mode=body.mode,
        status=body.status,
        served_update=agent.update_requested,
    )
    payload = heartbeat_response_bytes(
        changed=changed,
        serial=document.serial,
        next_heartbeat_s=next_heartbeat_s(document.heartbeat_s, fabric.settings.heartbeat_jitter),
        envelope=document.envelope if changed else None,
    )
    return Response(payload, media_type=JSON)


PLAIN_JSON = "plain JSON: no NaN or Infinity, no integers beyond 64 bits"
MAX_SERIAL = 2**63 - 1  # serials are BIGINT columns


def _require_storable(body: HeartbeatRequest) -> None:
    """Refuse what the database cannot hold: it would fail the batched bookkeeping of every agent."""
    if body.serial > MAX_SERIAL:
        raise Invalid(f"serial {body.serial} is beyond the 64-bit range")
    if body.status and not is_plain_json(body.status):
        raise Invalid(f"status must be {PLAIN_JSON}")
    if body.logs is not None:
        for index, entry in enumerate(body.logs.entries):
            if "\x00" in entry.message or "\x00" in entry.category:
                raise Invalid(f"log entry {index}: message and category may not contain NUL characters")
            if entry.data is not None and not is_plain_json(entry.data):
                raise Invalid(f"log entry {index}: data must be {PLAIN_JSON}")


def _store_logs(fabric: Fabric, agent: KnownAgent, body: HeartbeatRequest) -> None:
    assert body.logs is not None
    with Session(fabric.engine) as session:
        logs.store_log_batch(session, agent_id=agent.id, group_id=agent.group_id, batch=body.logs)


@router.get(
    "/config",
    response_class=Response,
    responses={
        200: {"description": "the signed envelope, with an ETag"},
        304: {"description": "not modified"},
    },
)
async def config(
    request: Request,
    fabric: FabricDep,
    location_id: int | None = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The current signed document of the agent's group and location (its Default when not given)."""
    _, agent = await authenticate_agent(request, fabric)
    _, document = await _document(fabric, agent, location_id)
    etag = f'"{document.serial}"'
    if if_none_match is not None and etag in {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    return Response(document.envelope, media_type=JSON, headers={"ETag": etag})
