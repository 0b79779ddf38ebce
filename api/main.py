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

from api.body_limit import BodyLimit
from api.console import install_console
from api.credentials import Credentials
from api.error_responses import install_error_handlers
from api.errors import ServiceError
from api.fabric import BrokerAccessFactory, open_fabric
from api.heartbeat.fast_path import HeartbeatFastPath
from api.json_body import JsonBodies
from api.openapi import install_openapi
from api.routes import (
    agents,
    api_keys,
    communication,
    content,
    enrollment,
    groups,
    heartbeat,
    locations,
    metrics,
    policies,
    trust,
)
from fabric_core.settings import Settings

log = logging.getLogger(__name__)


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
    fabric = await run_in_threadpool(
        lambda: open_fabric(settings, run_migrations=app.state.run_migrations, broker=app.state.broker)
    )
    app.state.fabric = fabric
    tasks = [
        asyncio.create_task(_every(settings.cache_refresh_s, fabric.view.refresh, "document cache refresh")),
        asyncio.create_task(
            _every(settings.heartbeat_flush_s, lambda: fabric.ledger.flush(fabric.engine), "heartbeat flush")
        ),
        asyncio.create_task(
            _every(
                settings.heartbeat_flush_s,
                lambda: fabric.keys.flush(fabric.engine),
                "API key last-used flush",
            )
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
        with contextlib.suppress(Exception):
            await run_in_threadpool(fabric.keys.flush, fabric.engine)
        fabric.engine.dispose()


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


def create_app(
    settings: Settings, *, run_migrations: bool = True, broker: BrokerAccessFactory | None = None
) -> FastAPI:
    """The manager's app. `broker` makes the broker engine's access for enrolment (the composition
    root passes it; without it agents enrol for pull only)."""
    app = FastAPI(
        title="Policycast manager",
        version="0.1.0",
        summary="Groups, locations, policies and signed effective configurations for endpoint agents.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.run_migrations = run_migrations
    app.state.broker = broker
    app.add_exception_handler(ServiceError, _service_error)
    install_error_handlers(app)
    admin_routers = (
        groups.router,
        locations.router,
        policies.router,
        communication.router,
        agents.router,
        api_keys.router,
        trust.admin_router,
    )
    for router in (*admin_routers, content.admin_router):
        app.include_router(router, prefix="/api/v1")
    app.include_router(enrollment.router)
    app.include_router(heartbeat.router)
    app.include_router(content.agent_router)
    app.include_router(trust.agent_router)
    app.include_router(metrics.router)  # outside both prefixes: no credentials (docs/operations.md)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    install_console(app)
    install_openapi(app)

    # Inside the body limit: a JSON body must be one orjson accepts (no lone surrogates, NaN, Infinity).
    app.add_middleware(JsonBodies, exempt=("/api/v1/blobs/",))
    app.add_middleware(
        BodyLimit, limit=settings.max_body_bytes, larger={"/api/v1/blobs/": settings.max_blob_bytes}
    )
    # Before any body is read: the bearer credential of /api/v1 and /agent/v1 (401/403 whatever the body).
    app.add_middleware(Credentials, state=app.state)
    # Outermost: the everyday heartbeat is answered before routing; anything else passes through.
    app.add_middleware(HeartbeatFastPath, state=app.state)
    return app
