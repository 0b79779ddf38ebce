"""**API Keys**: the keys that sign in to the admin API and this console (name, role, created, last
used, expires, revoked), **Add an API key** (its secret shown once, here), **Revoke**, and the bootstrap
key's state with **Retire the bootstrap key**. Viewers see the list only; a secret is never listed."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlmodel import Session

from api.console.deps import AdminDep, ChangeDep, FormDep, OperatorDep
from api.console.forms import Fields
from api.console.rendering import SECURITY_HEADERS, render
from api.console.sessions import Operator
from api.deps import FabricDep, SessionDep
from api.errors import Conflict, ServiceError
from api.fabric import Fabric
from api.params import RowId
from api.security import Role
from api.services import api_keys
from manager_db.models import as_utc, utcnow

router = APIRouter(prefix="/console/api-keys")
ROLES: tuple[Role, ...] = ("admin", "viewer")
MAX_EXPIRY_DAYS = 365
"""The admin API's longest lifetime (`api.routes.api_keys.MAX_EXPIRES_IN_S`), in days."""
DONE = {"revoked": "API key revoked.", "retired": "The bootstrap key is retired: no replica accepts it now."}
"""What a redirect after a change says (a fixed word in the query, never text of the operator's)."""


def _rows(session: Session, fabric: Fabric) -> list[api_keys.KeyView]:
    now = utcnow()
    return [
        api_keys.key_view(row, pending_use=fabric.keys.pending_use(row.id or 0), now=now)
        for row in api_keys.list_keys(session)
    ]


def _page(
    request: Request,
    session: Session,
    fabric: Fabric,
    operator: Operator,
    *,
    fields: Fields | None = None,
    created: dict[str, Any] | None = None,
    status_code: int = 200,
    message: str | None = None,
    level: str = "info",
) -> Response:
    retired = api_keys.bootstrap_retirement(session)
    context = {
        "operator": operator,
        "section": "api-keys",
        "keys": _rows(session, fabric),
        "bootstrap": {
            "configured": fabric.keys.bootstrap_configured,
            "retired_at": None if retired is None else as_utc(retired.retired_at),
            "retired_by": None if retired is None else retired.retired_by,
        },
        "roles": ROLES,
        "max_days": MAX_EXPIRY_DAYS,
        "values": fields.values if fields else {"name": "", "role": "viewer", "expires_days": ""},
        "errors": fields.errors if fields else {},
        "created": created,
        "message": message,
        "level": level,
    }
    return render(request, "api_keys.html", context, status_code=status_code)


def _done(what: str) -> Response:
    return RedirectResponse(f"/console/api-keys?done={what}", status_code=303, headers=SECURITY_HEADERS)


@router.get("", include_in_schema=False)
def api_keys_page(
    request: Request, operator: AdminDep, session: SessionDep, fabric: FabricDep, done: str = ""
) -> Response:
    """Admins only, as `GET /api/v1/api-keys` is: who holds which key is not a viewer's to know."""
    return _page(request, session, fabric, operator, message=DONE.get(done))


@router.post("", include_in_schema=False)
def add_key(
    request: Request, form: FormDep, change: ChangeDep, operator: OperatorDep, fabric: FabricDep
) -> Response:
    """**Add an API key**. Its secret is in this answer only (never redirected to, never stored in clear):
    the page says to copy it now. The answer is `no-store`, as every console answer."""
    fields = Fields(form)
    name = fields.name("name")
    role = fields.text("role", max_length=16)
    if role not in ROLES:
        fields.refuse("role", "Role must be admin or viewer")
    days = fields.integer("expires_days", low=1, high=MAX_EXPIRY_DAYS, what="Expires after (days)")
    if not fields.ok or name is None:
        return _page(request, change.session, fabric, operator, fields=fields, status_code=422)
    key, row = api_keys.create_key(
        change,
        role="admin" if role == "admin" else "viewer",
        name=name,
        expires_in_s=None if days is None else days * 86400,
    )
    change.commit()
    created = {"key": key, "name": row.name, "role": row.role, "expires_at": as_utc(row.expires_at)}
    return _page(request, change.session, fabric, operator, created=created, status_code=201)


@router.post("/bootstrap/retire", include_in_schema=False)
def retire_bootstrap(
    request: Request, change: ChangeDep, operator: OperatorDep, fabric: FabricDep
) -> Response:
    """**Retire the bootstrap key**: every replica refuses it, whatever its environment says; refused
    while no other admin key could take its place."""
    try:
        api_keys.retire_bootstrap(change)
        change.commit()
    except Conflict as refused:
        change.session.rollback()
        message = f"The bootstrap key was not retired: {refused.detail}"
        return _page(
            request, change.session, fabric, operator, status_code=409, message=message, level="error"
        )
    return _done("retired")


@router.post("/{key_id}/revoke", include_in_schema=False)
def revoke_key(
    request: Request, key_id: RowId, change: ChangeDep, operator: OperatorDep, fabric: FabricDep
) -> Response:
    """**Revoke**: refused at once on this replica, within the key cache's refresh on the others; the
    console sessions it opened end with it."""
    try:
        api_keys.revoke_key(change, key_id=key_id)
        change.commit()
    except ServiceError as refused:  # no such key, or already revoked
        change.session.rollback()
        message = f"The key was not revoked: {refused.detail}"
        return _page(
            request,
            change.session,
            fabric,
            operator,
            status_code=refused.status_code,
            message=message,
            level="error",
        )
    return _done("revoked")
