"""The operator's console under `/console`, following SEPM's (DESIGN.md §9).

Server-rendered: Jinja2 templates, with htmx (shipped in `static/`, nothing fetched at run time) for the
live parts. Pages call the same keyword-only services as the admin API, in the same `Change`
transactions, so a change made here is audited, signed and published exactly as one made over REST.

    api.console.sessions        sign-in with an API key → a session in SQL, its cookie and CSRF token
    api.console.deps            the signed-in operator, admin rights, CSRF-checked forms, a change
    api.console.rendering       templates, security headers, errors shown in the page
    api.console.group_view      the group tree around a selected group
    api.console.communication_form   the Communications Settings dialog's fields ↔ settings
    api.console.forms           a form's fields read and refused one by one, each at its field
    api.console.pages.*         one module per part of the console
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.console.deps import ConsoleRefusal
from api.console.pages import (
    api_keys,
    audit,
    clients,
    content,
    group_policies,
    locations,
    logs,
    policies,
    signin,
)
from api.console.rendering import console_refusal, refusal_page
from api.error_responses import summary
from api.errors import ServiceError

PREFIX = "/console"
ROUTERS = (
    signin.router,
    clients.router,
    group_policies.router,
    locations.router,
    policies.router,
    content.router,
    logs.router,
    audit.router,
    api_keys.router,
)


def in_console(request: Request) -> bool:
    path = request.url.path
    return path == PREFIX or path.startswith(PREFIX + "/")


def install_console(app: FastAPI) -> None:
    """Add the console's pages, its static files and its error pages to the manager's app."""
    for router in ROUTERS:
        app.include_router(router)
    app.mount(
        f"{PREFIX}/static", StaticFiles(directory=Path(__file__).parent / "static"), name="console-static"
    )
    app.add_exception_handler(ConsoleRefusal, console_refusal)
    _in_console_too(
        app, ServiceError, lambda request, exc: refusal_page(request, exc.status_code, exc.detail)
    )
    _in_console_too(
        app,
        StarletteHTTPException,
        lambda request, exc: refusal_page(request, exc.status_code, str(exc.detail)),
    )
    _in_console_too(
        app,
        RequestValidationError,
        lambda request, exc: refusal_page(request, 422, summary(exc.errors())),
    )


def _in_console_too(app: FastAPI, kind: type[Exception], page: Callable[[Request, Any], Response]) -> None:
    """The app's handler for `kind` answers JSON; under /console the same error is shown as a page."""
    api_handler = app.exception_handlers[kind]

    async def handler(request: Request, exc: Exception) -> Response:
        if in_console(request):
            return page(request, exc)
        answered = api_handler(request, exc)
        return await answered if inspect.isawaitable(answered) else answered

    app.add_exception_handler(kind, handler)
