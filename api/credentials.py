"""`Credentials`: an ASGI layer that checks the bearer credential before anything reads the body.

FastAPI parses and validates a body before the route runs (malformed JSON even before dependencies),
so a caller with a bad secret and a bad body would learn about the body (422, 413) rather than about
its secret. This layer answers first, from headers alone: every path under `/api/v1` needs an API key
(and a change, any method but GET and HEAD, an admin one), every path under `/agent/v1` but the
`OPEN_PATHS` needs an agent secret. Health, docs and the OpenAPI document are outside both prefixes.

It reuses the in-memory lookups (`ApiKeyCache`, `FabricView.cached_agent`), reading the database only
on a cache miss, in a worker thread. What it found travels in the ASGI scope (`PRINCIPAL`, `AGENT`),
so that the route's dependencies (`api.deps.get_principal`, `api.agent_auth.authenticate_agent`) do
not look the caller up again; they check for themselves when the layer did not run.

The heartbeat fast path (`api.heartbeat.fast_path`) stays in front of this layer: it answers only
agents it found in memory, not revoked, which this layer would admit, and costs them no second lookup.
"""

from __future__ import annotations

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import Forbidden, ServiceError, Unauthorized
from api.fabric import Fabric
from api.heartbeat.view import KnownAgent
from api.security import Principal, bearer_token, hash_secret

ADMIN_PREFIX = "/api/v1"
AGENT_PREFIX = "/agent/v1"
OPEN_PATHS = frozenset({"/agent/v1/enroll", "/agent/v1/ca"})
"""Paths under the prefixes that need no bearer credential: enrolment carries its token in the body,
and an agent fetches the CA before it has anything to authenticate with."""
READ_METHODS = frozenset({"GET", "HEAD"})
PRINCIPAL = "policycast.principal"
AGENT = "policycast.agent"
"""Scope keys: the admin API's `Principal`; the agent API's (secret hash, `KnownAgent`)."""


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


async def admin_principal(fabric: Fabric, authorization: str | None) -> Principal:
    """The caller of the admin API; `Unauthorized` for no, unknown, revoked or expired keys."""
    key = bearer_token(authorization)
    principal = fabric.keys.authenticate(key, load=False)
    if principal is None:  # not in memory: made through another process since the last poll
        principal = await run_in_threadpool(fabric.keys.authenticate, key, load=True)
    assert principal is not None
    return principal


def require_change_rights(principal: Principal) -> Principal:
    if not principal.can_change:
        raise Forbidden(f"{principal.name} is a viewer: only admin keys may change state")
    return principal


async def agent_caller(fabric: Fabric, authorization: str | None) -> tuple[str, KnownAgent]:
    """(secret hash, agent) of the caller; 401 for no or an unknown secret, 403 for a revoked agent."""
    secret = bearer_token(authorization)
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


class Credentials:
    """Check the bearer credential of `/api/v1` and `/agent/v1` requests before the app reads a byte
    of their body; answer 401 or 403 at once, or pass the request on with the caller in its scope."""

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fabric: Fabric | None = getattr(self.state, "fabric", None)
        if scope["type"] != "http" or fabric is None:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        admin = _under(path, ADMIN_PREFIX)
        if not admin and (not _under(path, AGENT_PREFIX) or path in OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        authorization = next(
            (value.decode("latin-1") for name, value in scope["headers"] if name == b"authorization"), None
        )
        try:
            if admin:
                principal = await admin_principal(fabric, authorization)
                if scope["method"] not in READ_METHODS:
                    require_change_rights(principal)
                scope[PRINCIPAL] = principal
            else:
                scope[AGENT] = await agent_caller(fabric, authorization)
        except ServiceError as refused:
            (fabric.metrics.admin_auth_failures if admin else fabric.metrics.agent_auth_failures).inc()
            headers = {"WWW-Authenticate": "Bearer"} if refused.status_code == 401 else None
            response = JSONResponse({"detail": refused.detail}, refused.status_code, headers=headers)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
