"""The console's dependencies: who is signed in, their rights, a CSRF-checked form, a change.

    ConsoleRefusal          an error the console shows in the page, with the status it answers
    └── SignInRequired      no session, or one that ended: back to the sign-in page

Every write of the console is a POST whose form (or `X-CSRF-Token` header, which htmx sends for every
request from the page's `hx-headers`) carries the session's CSRF token; the cookie alone is not enough,
so a page elsewhere cannot make the operator's browser change anything (and SameSite=Strict keeps the
cookie off such requests in the first place).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from api.console.sessions import COOKIE, Operator, csrf_matches, operator_of
from api.deps import FabricDep, SessionDep
from api.errors import ServiceError
from api.services.change import Change

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


class ConsoleRefusal(Exception):
    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


class SignInRequired(ConsoleRefusal):
    def __init__(self, detail: str) -> None:
        super().__init__(401, detail)


async def current_operator(request: Request, fabric: FabricDep) -> Operator:
    try:
        return await run_in_threadpool(operator_of, fabric.engine, fabric.keys, request.cookies.get(COOKIE))
    except ServiceError as refused:
        raise SignInRequired(refused.detail) from refused


OperatorDep = Annotated[Operator, Depends(current_operator)]


def require_admin(operator: OperatorDep) -> Operator:
    if not operator.can_change:
        raise ConsoleRefusal(403, f"{operator.name} is a viewer: only admin keys may do this")
    return operator


AdminDep = Annotated[Operator, Depends(require_admin)]


async def signed_form(request: Request, operator: OperatorDep) -> FormData:
    """The POSTed form, once its CSRF token is the session's; 403 otherwise (and nothing changes)."""
    form = await request.form()
    given = form.get(CSRF_FIELD)
    token = given if isinstance(given, str) else request.headers.get(CSRF_HEADER)
    if not csrf_matches(operator.csrf_token, token):
        raise ConsoleRefusal(403, "the form's CSRF token is missing or wrong: reload the page and try again")
    return form


SignedFormDep = Annotated[FormData, Depends(signed_form)]


def admin_form(_: AdminDep, form: SignedFormDep) -> FormData:
    """A form that changes something: an admin's, with the session's CSRF token."""
    return form


FormDep = Annotated[FormData, Depends(admin_form)]


def console_change(operator: AdminDep, session: SessionDep, fabric: FabricDep, _: FormDep) -> Change:
    """A change made from the console: the same transaction and audit row as the admin API's."""
    return Change(
        session=session,
        actor=operator.name,
        signing_key=fabric.signing_key,
        after_commit=fabric.view.refresh,
    )


ChangeDep = Annotated[Change, Depends(console_change)]
