"""The manager's ASGI app: `create_app(settings)` builds it; the lifespan makes the long-lived parts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from manager_db.database import make_engine, migrate, session_scope
from api.deps import Fabric
from api.errors import ServiceError
from api.heartbeat import FabricView, HeartbeatLedger
from api.routes import agent_api, agents, communication, content, groups, locations, policies
from api.services.change import Change
from api.services.groups import ensure_root
from fabric_core.settings import Settings
from fabric_core.signing import load_signing_key

log = logging.getLogger(__name__)


def open_fabric(settings: Settings, *, run_migrations: bool = True) -> Fabric:
    """Connect, migrate, make sure the root group exists, and load the heartbeat view."""
    engine = make_engine(settings.resolved_database_url)
    if run_migrations:
        migrate(engine)
    signing_key = load_signing_key(settings)
    with session_scope(engine) as session:
        change = Change(session=session, actor="system", signing_key=signing_key)
        ensure_root(change)
    view = FabricView(engine)
    view.refresh()
    return Fabric(
        settings=settings, engine=engine, signing_key=signing_key, view=view, ledger=HeartbeatLedger()
    )


async def _every(seconds: float, work: Callable[[], Any], what: str) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await run_in_threadpool(work)
        except Exception:
            log.exception("%s failed; retrying in %.1fs", what, seconds)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    fabric = await run_in_threadpool(lambda: open_fabric(settings, run_migrations=app.state.run_migrations))
    app.state.fabric = fabric
    tasks = [
        asyncio.create_task(_every(settings.cache_refresh_s, fabric.view.refresh, "document cache refresh")),
        asyncio.create_task(
            _every(settings.heartbeat_flush_s, lambda: fabric.ledger.flush(fabric.engine), "heartbeat flush")
        ),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await run_in_threadpool(fabric.ledger.flush, fabric.engine)
        fabric.engine.dispose()


class BodyLimit:
    """Refuse request bodies over the limit with 413, whether or not Content-Length is honest.

    `limit` holds for every path but those under a prefix of `larger` (content uploads), which have
    their own."""

    def __init__(self, app: ASGIApp, limit: int, larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.default_limit = limit
        self.larger = larger or {}

    def limit_for(self, path: str) -> int:
        return next((n for prefix, n in self.larger.items() if path.startswith(prefix)), self.default_limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit)
            return
        received = 0
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    raise _TooLarge
            return message

        started = False

        async def guarded_send(message: Message) -> None:
            # FastAPI turns any error while reading the body (our _TooLarge among them) into its own
            # 400; once the body is refused, drop what the app answers and send the 413 instead.
            nonlocal started
            if refused:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:
                raise
        if refused and not started:
            await self._refuse(send, limit)

    async def _refuse(self, send: Send, limit: int) -> None:
        response = JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)
        await response({"type": "http"}, _no_receive, send)


class _TooLarge(Exception):
    pass


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


def create_app(settings: Settings, *, run_migrations: bool = True) -> FastAPI:
    app = FastAPI(
        title="Policycast manager",
        version="0.1.0",
        summary="Groups, locations, policies and signed effective configurations for endpoint agents.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.run_migrations = run_migrations
    app.add_exception_handler(ServiceError, _service_error)
    admin_routers = (groups.router, locations.router, policies.router, communication.router, agents.router)
    for router in (*admin_routers, content.admin_router):
        app.include_router(router, prefix="/api/v1")
    app.include_router(agent_api.router)
    app.include_router(content.agent_router)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(
        BodyLimit, limit=settings.max_body_bytes, larger={"/api/v1/blobs/": settings.max_blob_bytes}
    )
    # Outermost: the everyday heartbeat is answered before routing; anything else passes through.
    app.add_middleware(agent_api.HeartbeatFastPath, state=app.state)
    return app
