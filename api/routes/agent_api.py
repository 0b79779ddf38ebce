"""/agent/v1: what agents call. Enrolment, the heartbeat (the hot path) and the config fetch.

The heartbeat has two doors to the same behaviour:

- `HeartbeatFastPath`, an ASGI layer in front of the app (installed by `create_app`), answers the
  everyday request itself: a known, not revoked agent sending a small, well-formed JSON body without a
  log batch. It parses with orjson and checks the body by hand (a strict subset of what the model
  accepts), and skips FastAPI's routing, dependency solving and generic validation, which cost several
  times the work of the heartbeat itself (docs/performance.md).
- the FastAPI route `heartbeat` below handles everything else: unknown or uncached secrets, revoked
  agents, log uploads, pending "update now" requests, and every request the fast path is not sure
  about, which it hands over untouched (the body it read is replayed). So every 4xx comes from one
  place, with the same words, and the route documents the body in the OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
HEARTBEAT_PATH = "/agent/v1/heartbeat"


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
    if body.status is not None and not is_plain_json(body.status):
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
    location_id: int | None = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The current signed document of the agent's group and location (its Default when not given)."""
    fabric: Fabric = request.app.state.fabric  # not FabricDep: no thread hop (see `heartbeat`)
    _, agent = await authenticate_agent(request, fabric)
    _, document = await _document(fabric, agent, location_id)
    etag = f'"{document.serial}"'
    if if_none_match is not None and etag in {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    return Response(document.envelope, media_type=JSON, headers={"ETag": etag})


# --- the fast path -----------------------------------------------------------------------------------

FAST_BODY_LIMIT = 16 * 1024
"""Bodies the fast path reads; larger ones (log batches) go to the route, under the app's body limit."""
_FIELDS = frozenset({"serial", "location_id", "mode", "status", "logs"})
_MODES = frozenset({"push", "pull"})
_MIN_INT = -(2**63)
_MAX_INT = 2**64 - 1  # what orjson, hence canonical JSON, can write
_JSON_HEADERS = [(b"content-type", JSON.encode())]


class HeartbeatFastPath:
    """Answer the everyday heartbeat before FastAPI; hand anything else to the app, body replayed.

    It answers only when it is sure the route would answer 200 with the same bytes: the body is valid
    for `HeartbeatRequest` (strict types: an int is an int), storable (`_require_storable`), carries no
    log batch, and the agent is in this process's cache, not revoked, with no "update now" pending.
    """

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != HEARTBEAT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        fabric: Fabric | None = getattr(self.state, "fabric", None)
        length: bytes | None = None
        authorization: bytes | None = None
        content_type: bytes | None = None
        for name, value in scope["headers"]:  # the first of each, as Starlette's `headers.get` reads them
            if name == b"content-length" and length is None:
                length = value
            elif name == b"authorization" and authorization is None:
                authorization = value
            elif name == b"content-type" and content_type is None:
                content_type = value
        if (
            fabric is None
            or authorization is None
            or content_type is None
            or content_type.split(b";", 1)[0].strip().lower() != b"application/json"
            or length is None
            or not length.isdigit()
            or not 0 < int(length) <= FAST_BODY_LIMIT
        ):
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay(body, message, receive), send)
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        payload = _fast_heartbeat(fabric, authorization, body)
        if payload is None:
            await self.app(scope, _replay(body, None, receive), send)
            return
        headers = [(b"content-length", b"%d" % len(payload)), *_JSON_HEADERS]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _replay(body: bytes, pending: Message | None, receive: Receive) -> Receive:
    """A `receive` that gives the app the body the fast path already read, then the rest."""
    sent = False

    async def replay() -> Message:
        nonlocal sent, pending
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": pending is not None}
        if pending is not None:
            message, pending = pending, None
            return message
        return await receive()

    return replay


def _fast_heartbeat(fabric: Fabric, authorization: bytes, body: bytes) -> bytes | None:
    """The response to an everyday heartbeat, or None when the route must decide."""
    secret = bearer_token(authorization.decode("latin-1"))
    if secret is None:
        return None
    secret_hash = hash_secret(secret)
    agent = fabric.view.cached_agent(secret_hash)
    if agent is None or agent.revoked or agent.update_requested:
        return None
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(request) is not dict or not _FIELDS.issuperset(request) or request.get("logs") is not None:
        return None
    serial = request.get("serial")
    location_id = request.get("location_id")
    mode = request.get("mode")
    agent_status = request.get("status")  # absent or null: unchanged, the manager keeps what it holds
    if (
        type(serial) is not int
        or not 0 <= serial <= MAX_SERIAL
        or not (location_id is None or type(location_id) is int)
        or type(mode) is not str
        or mode not in _MODES
        or not (agent_status is None or (type(agent_status) is dict and _plain(agent_status)))
    ):
        return None
    found = fabric.view.document_for(agent.group_id, location_id)
    if found is None:
        return None
    location, document = found
    changed = document.serial != serial
    fabric.ledger.record(
        agent.id, serial=serial, location_id=location, mode=mode, status=agent_status, served_update=False
    )
    return heartbeat_response_bytes(
        changed=changed,
        serial=document.serial,
        next_heartbeat_s=next_heartbeat_s(document.heartbeat_s, fabric.settings.heartbeat_jitter),
        envelope=document.envelope if changed else None,
    )


def _plain(value: Any, depth: int = 0) -> bool:
    """`is_plain_json` for what orjson parsed, without floats: orjson reads an integer beyond 64 bits
    as a float, where the route's parser keeps the integer and refuses it; so any float goes there."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(_MIN_INT <= value <= _MAX_INT)
    if depth > 64:
        return False
    if kind is dict:
        return all(_plain(item, depth + 1) for item in value.values())
    if kind is list:
        return all(_plain(item, depth + 1) for item in value)
    return False
