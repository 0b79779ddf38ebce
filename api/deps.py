"""FastAPI dependencies: the long-lived parts (made in the lifespan), sessions, and who is calling."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel import Session

from api.errors import Forbidden
from api.fabric import Fabric
from api.security import Principal, bearer_token
from api.services.api_keys import authenticate
from api.services.change import Change


def get_fabric(request: Request) -> Fabric:
    fabric: Fabric = request.app.state.fabric
    return fabric


FabricDep = Annotated[Fabric, Depends(get_fabric)]


def get_session(fabric: FabricDep) -> Iterator[Session]:
    with Session(fabric.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_principal(request: Request, fabric: FabricDep) -> Principal:
    bootstrap = fabric.settings.bootstrap_admin_key
    with Session(fabric.engine) as session:
        return authenticate(
            session,
            key=bearer_token(request.headers.get("authorization")),
            bootstrap_key=bootstrap.get_secret_value() if bootstrap else None,
        )


ViewerDep = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: ViewerDep) -> Principal:
    if not principal.can_change:
        raise Forbidden(f"{principal.name} is a viewer: only admin keys may change state")
    return principal


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
