"""/api/v1/api-keys: the lifecycle of admin API keys, and the retirement of the bootstrap key (admin only).

A key's secret is shown once, in the answer that creates it; the list never shows it.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AdminDep, ChangeDep, FabricDep, SessionDep
from api.params import RowId
from api.schemas import Name
from api.services import api_keys
from manager_db.models import ApiKey, as_utc, utcnow

router = APIRouter(prefix="/api-keys", tags=["api-keys"])

MAX_EXPIRES_IN_S = 365 * 86400
_REFUSED: dict[int | str, dict[str, Any]] = {
    401: {"description": "no, an unknown, revoked or expired API key"},
    403: {"description": "a viewer key: managing keys needs an admin key"},
}


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["admin", "viewer"]
    name: Name = "operator"
    expires_in_s: int | None = Field(
        default=None, ge=60, le=MAX_EXPIRES_IN_S, description="lifetime in seconds; none: never expires"
    )


class ApiKeyOut(BaseModel):
    id: int
    name: str
    role: str
    created_at: datetime
    last_used_at: datetime | None = Field(
        description="the last request it authenticated, written in batches (allow a few seconds)"
    )
    expires_at: datetime | None
    revoked_at: datetime | None
    active: bool = Field(description="neither revoked nor expired")


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="the secret, `pck_…`: shown only here, stored hashed")


class BootstrapKeyOut(BaseModel):
    configured: bool = Field(description="this replica's environment sets POLICYCAST_BOOTSTRAP_ADMIN_KEY")
    retired: bool = Field(description="refused by every replica, whatever its environment says")
    retired_at: datetime | None
    retired_by: str | None


def _out(row: ApiKey, fabric: FabricDep) -> ApiKeyOut:
    assert row.id is not None
    view = api_keys.key_view(row, pending_use=fabric.keys.pending_use(row.id), now=utcnow())
    return ApiKeyOut(**asdict(view))


@router.get("", response_model=list[ApiKeyOut], responses=_REFUSED)
def list_keys(session: SessionDep, fabric: FabricDep, _: AdminDep) -> list[ApiKeyOut]:
    """Every API key, oldest first, revoked and expired ones too; never a secret."""
    return [_out(row, fabric) for row in api_keys.list_keys(session)]


@router.post(
    "",
    response_model=ApiKeyCreated,
    status_code=status.HTTP_201_CREATED,
    responses={**_REFUSED, 422: {"description": "an unknown role, a bad name or lifetime"}},
)
def create_key(body: ApiKeyCreate, change: ChangeDep, fabric: FabricDep) -> ApiKeyCreated:
    """A new key. Its secret (`key`) is in this answer only: save it now."""
    key, row = api_keys.create_key(change, role=body.role, name=body.name, expires_in_s=body.expires_in_s)
    change.commit()
    return ApiKeyCreated(**_out(row, fabric).model_dump(), key=key)


@router.get("/bootstrap", response_model=BootstrapKeyOut, responses=_REFUSED)
def bootstrap_key(session: SessionDep, fabric: FabricDep, _: AdminDep) -> BootstrapKeyOut:
    """Whether the bootstrap admin key (POLICYCAST_BOOTSTRAP_ADMIN_KEY) is still accepted."""
    retired = api_keys.bootstrap_retirement(session)
    return BootstrapKeyOut(
        configured=fabric.keys.bootstrap_configured,
        retired=retired is not None,
        retired_at=None if retired is None else as_utc(retired.retired_at),
        retired_by=None if retired is None else retired.retired_by,
    )


@router.delete(
    "/bootstrap",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**_REFUSED, 409: {"description": "already retired, or no usable admin key to take its place"}},
)
def retire_bootstrap_key(change: ChangeDep) -> Response:
    """Retire the bootstrap admin key: every replica refuses it within `cache_refresh_s`, even while its
    environment still sets POLICYCAST_BOOTSTRAP_ADMIN_KEY. Needs an active admin key to exist."""
    api_keys.retire_bootstrap(change)
    change.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete(
    "/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**_REFUSED, 404: {"description": "no such key"}, 409: {"description": "already revoked"}},
)
def revoke_key(key_id: RowId, change: ChangeDep) -> Response:
    """Revoke a key: refused (401) at once by this replica, within `cache_refresh_s` by the others."""
    api_keys.revoke_key(change, key_id=key_id)
    change.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
