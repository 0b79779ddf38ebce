"""`HeartbeatFastPath`: an ASGI layer that answers the everyday heartbeat before FastAPI does.

The everyday request is a known, not revoked agent sending a small, well-formed JSON body without a
log batch. The layer parses it with orjson, checks it against the request model's own definitions
(`checks.everyday`), and skips FastAPI's routing, dependency solving and generic validation, which
cost several times the work of the heartbeat itself (docs/performance.md). Anything it is not sure
about goes to the route untouched (the body it read is replayed), so every 4xx comes from one place,
with the same words. The answer itself is written by `answer.answer_heartbeat`, as the route's is.

Metrics (`api.metrics`): a heartbeat it answers counts as a fast-path hit; one it hands to the app
counts by the status the app answers when that is an error (the 200s count in `answer_heartbeat`).
"""

from __future__ import annotations

import orjson
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.asgi_replay import replay
from api.fabric import Fabric
from api.heartbeat.answer import answer_heartbeat
from api.heartbeat.checks import everyday
from api.security import bearer_token, hash_secret

HEARTBEAT_PATH = "/agent/v1/heartbeat"
FAST_BODY_LIMIT = 16 * 1024
"""Bodies the fast path reads; larger ones (log batches) go to the route, under the app's body limit."""
_JSON_HEADERS = [(b"content-type", b"application/json")]


class HeartbeatFastPath:
    """Answer the everyday heartbeat before FastAPI; hand anything else to the app, body replayed.

    It answers only when it is sure the route would answer 200 with the same bytes: the body is valid
    for `HeartbeatRequest` (strict types), storable, carries no log batch, and the agent is in this
    process's cache, not revoked, with no "update now" pending.
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
        if fabric is None:
            await self.app(scope, receive, send)
            return
        if (
            authorization is None
            or content_type is None
            or content_type.split(b";", 1)[0].strip().lower() != b"application/json"
            or length is None
            or not length.isdigit()
            or not 0 < int(length) <= FAST_BODY_LIMIT
        ):
            await self.app(scope, receive, _counting(fabric, send))
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, replay(body, message, receive), _counting(fabric, send))
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        payload = fast_heartbeat(fabric, authorization, body)
        if payload is None:
            await self.app(scope, replay(body, None, receive), _counting(fabric, send))
            return
        headers = [(b"content-length", b"%d" % len(payload)), *_JSON_HEADERS]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def fast_heartbeat(fabric: Fabric, authorization: bytes, body: bytes) -> bytes | None:
    """The answer to an everyday heartbeat, or None when the route must decide."""
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
    if not everyday(request):
        return None
    found = fabric.view.document_for(agent.group_id, request.get("location_id"))
    if found is None:
        return None
    answer = answer_heartbeat(
        fabric,
        agent,
        secret_hash=secret_hash,
        serial=request["serial"],
        mode=request["mode"],
        status=request.get("status"),
        found=found,
        mqtt_expires_at=request.get("mqtt_expires_at"),
    )
    fabric.metrics.fast_path_hits.inc()
    return answer


def _counting(fabric: Fabric, send: Send) -> Send:
    """`send`, counting the heartbeat by its status when the app refuses it (a heartbeat the fast
    path answers itself is a 200 and never an error)."""

    async def counted(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            fabric.metrics.heartbeat_refused(message["status"])
        await send(message)

    return counted
