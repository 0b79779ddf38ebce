"""Signing in with an API key, and out."""

from __future__ import annotations

import logging
import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from api.console.deps import OperatorDep, SignedFormDep
from api.console.rendering import SECURITY_HEADERS, render
from api.console.sessions import COOKIE, SIGNIN_COOKIE, csrf_matches, end_session, open_session
from api.deps import FabricDep
from api.errors import ServiceError

log = logging.getLogger(__name__)
router = APIRouter()
HOME = "/console/clients"


def _safe_next(target: str | None) -> str:
    """Only a console path: a sign-in page must not send the operator off to another site."""
    if target and target.startswith("/console/") and not target.startswith("//") and "\\" not in target:
        return target
    return HOME


def _signin_page(
    request: Request, *, next_path: str, error: str | None = None, status_code: int = 200
) -> Response:
    token = secrets.token_urlsafe(32)
    response = render(
        request,
        "signin.html",
        {"operator": None, "signin_token": token, "next": next_path, "error": error},
        status_code=status_code,
    )
    response.set_cookie(
        SIGNIN_COOKIE,
        token,
        max_age=600,
        path="/console/signin",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    return response


@router.get("/console", include_in_schema=False)
@router.get("/console/", include_in_schema=False)
def console_home() -> Response:
    return RedirectResponse(HOME, status_code=303, headers=SECURITY_HEADERS)


@router.get("/console/signin", include_in_schema=False)
def signin_page(request: Request, next: str | None = None) -> Response:
    return _signin_page(request, next_path=_safe_next(next))


@router.post("/console/signin", include_in_schema=False)
async def sign_in(
    request: Request,
    fabric: FabricDep,
    api_key: Annotated[str, Form(max_length=512)] = "",
    signin_token: Annotated[str, Form(max_length=128)] = "",
    next: Annotated[str, Form(max_length=512)] = HOME,
) -> Response:
    if not csrf_matches(request.cookies.get(SIGNIN_COOKIE, ""), signin_token):
        return _signin_page(
            request, next_path=_safe_next(next), error="The sign-in form expired: try again.", status_code=403
        )
    try:
        session_id, _ = await run_in_threadpool(
            lambda: open_session(
                fabric.engine, fabric.keys, api_key=api_key, ttl_s=fabric.settings.console_session_ttl_s
            )
        )
    except ServiceError as refused:
        # Counted and logged as the admin API's refusals are; never the key that was typed.
        fabric.metrics.admin_auth_failures.inc()
        client = request.client.host if request.client else "unknown"
        log.warning("console sign-in refused from %s: %s", client, refused.detail)
        return _signin_page(request, next_path=_safe_next(next), error=refused.detail, status_code=401)
    response = RedirectResponse(_safe_next(next), status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=fabric.settings.console_session_ttl_s,
        path="/console",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    response.delete_cookie(SIGNIN_COOKIE, path="/console/signin")
    return response


@router.post("/console/signout", include_in_schema=False)
async def sign_out(operator: OperatorDep, _: SignedFormDep, fabric: FabricDep) -> Response:
    await run_in_threadpool(end_session, fabric.engine, operator)
    response = RedirectResponse("/console/signin", status_code=303, headers=SECURITY_HEADERS)
    response.delete_cookie(COOKIE, path="/console", secure=True, httponly=True, samesite="strict")
    return response
