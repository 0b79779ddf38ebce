"""FastAPI dependencies: the long-lived parts (made in the lifespan), sessions, and who is calling."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel import Session

from api.credentials import PRINCIPAL, admin_principal, require_change_rights
from api.fabric import Fabric
from api.security import Principal
from api.services.change import Change


def get_fabric(request: Request) -> Fabric:
    fabric: Fabric = request.app.state.fabric
    return fabric


FabricDep = Annotated[Fabric, Depends(get_fabric)]


def get_session(fabric: FabricDep) -> Iterator[Session]:
    with Session(fabric.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


async def get_principal(request: Request) -> Principal:
    """Who is calling: found by the `api.credentials.Credentials` layer before the body was read, or
    (an app without that layer) checked here."""
    found = request.scope.get(PRINCIPAL)
    if isinstance(found, Principal):
        return found
    return await admin_principal(request.app.state.fabric, request.headers.get("authorization"))


ViewerDep = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: ViewerDep) -> Principal:
    return require_change_rights(principal)


AdminDep = Annotated[Principal, Depends(require_admin)]


def get_change(principal: AdminDep, session: SessionDep, fabric: FabricDep) -> Change:
    """A change transaction; services call `change.commit()`, which also refreshes this process's view."""
    return Change(
        session=session,
        actor=principal.name,
        signing_key=fabric.signing_key,
        after_commit=fabric.view.refresh,
    )


ChangeDep = Annotated[Change, Depends(get_change)]
