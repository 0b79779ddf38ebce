"""The CAs agents trust: `GET /agent/v1/ca` for agents about to enrol, and their management under
/api/v1/tls (a CA rotation; see docs/operations.md, "TLS")."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import ChangeDep, SessionDep, ViewerDep
from api.errors import NotFound
from api.services import trust
from manager_db.models import as_utc

agent_router = APIRouter(prefix="/agent/v1", tags=["agent"])
admin_router = APIRouter(prefix="/tls", tags=["tls"])
PEM = "application/x-pem-file"


class TrustedCaOut(BaseModel):
    sha256: str
    pem: str
    added_at: datetime


@agent_router.get(
    "/ca",
    response_class=Response,
    responses={
        200: {"content": {PEM: {}}, "description": "the CA certificates agents trust, oldest first"},
        404: {"description": "no CA is trusted (a manager behind a TLS-terminating proxy, none added)"},
    },
)
def ca_bundle(session: SessionDep) -> Response:
    """The CAs agents trust (the manager's own and, during a rotation, its successor). Unauthenticated:
    an agent fetches it before it enrols, keeps the one certificate whose hash came with its token,
    checks the server's chain against that one, and sends the token only then."""
    rows = trust.trusted(session)
    if not rows:
        raise NotFound("this manager names no CA: ask its operator for the CA hash and certificate")
    return Response("".join(row.pem for row in rows).encode("ascii"), media_type=PEM)


@admin_router.get("/trusted-cas", response_model=list[TrustedCaOut])
def list_trusted(session: SessionDep, _: ViewerDep) -> list[TrustedCaOut]:
    """The CAs every document names, oldest first."""
    return [
        TrustedCaOut(sha256=row.sha256, pem=row.pem, added_at=as_utc(row.added_at))
        for row in trust.trusted(session)
    ]


class TrustCaIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pem: str = Field(min_length=1, max_length=16_384, description="one PEM certificate")


@admin_router.post("/trusted-cas", response_model=TrustedCaOut, status_code=status.HTTP_201_CREATED)
def trust_ca(body: TrustCaIn, change: ChangeDep) -> TrustedCaOut:
    """Trust another CA: every document gets a new serial naming it (the first step of a rotation)."""
    row, _added = trust.trust_ca(change, pem=body.pem.encode("utf-8", "replace"))
    change.commit()
    return TrustedCaOut(sha256=row.sha256, pem=row.pem, added_at=as_utc(row.added_at))


@admin_router.delete("/trusted-cas/{sha256}", status_code=status.HTTP_204_NO_CONTENT)
def retire_ca(sha256: str, change: ChangeDep) -> None:
    """Stop trusting a CA (the last step of a rotation); the only one cannot be retired (409)."""
    trust.retire_ca(change, sha256=sha256)
    change.commit()
