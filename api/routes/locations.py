"""/api/v1/groups/{id}/locations: locations, their conditions, and the signed effective documents."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from api.deps import ChangeDep, SessionDep, ViewerDep
from api.errors import NotFound
from api.openapi import errors
from api.params import RowId
from api.schemas import LocationCreate, LocationOut, LocationUpdate
from api.services import locations
from fabric_core.wire import Envelope
from manager_db.models import EffectiveConfig, Location

router = APIRouter(prefix="/groups/{group_id}/locations", tags=["locations"])


def _out(location: Location) -> LocationOut:
    assert location.id is not None
    return LocationOut(
        id=location.id,
        name=location.name,
        is_default=location.is_default,
        conditions=location.conditions,
        group_id=location.group_id,
    )


@router.get("", response_model=list[LocationOut], responses=errors(404))
def list_locations(group_id: RowId, session: SessionDep, _: ViewerDep) -> list[LocationOut]:
    return [_out(loc) for loc in locations.list_locations(session, group_id=group_id)]


@router.post("", response_model=LocationOut, status_code=status.HTTP_201_CREATED, responses=errors(404, 409))
def create_location(group_id: RowId, body: LocationCreate, change: ChangeDep) -> LocationOut:
    location = locations.create_location(
        change,
        group_id=group_id,
        name=body.name,
        conditions=[c.model_dump(exclude_none=True) for c in body.conditions],
    )
    change.commit()
    return _out(location)


@router.get("/{location_id}", response_model=LocationOut, responses=errors(404))
def get_location(group_id: RowId, location_id: RowId, session: SessionDep, _: ViewerDep) -> LocationOut:
    return _out(locations.get_location(session, group_id=group_id, location_id=location_id))


@router.patch("/{location_id}", response_model=LocationOut, responses=errors(404, 409))
def update_location(
    group_id: RowId, location_id: RowId, body: LocationUpdate, change: ChangeDep
) -> LocationOut:
    conditions = (
        None if body.conditions is None else [c.model_dump(exclude_none=True) for c in body.conditions]
    )
    location = locations.update_location(
        change, group_id=group_id, location_id=location_id, name=body.name, conditions=conditions
    )
    change.commit()
    return _out(location)


@router.delete("/{location_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 409))
def delete_location(group_id: RowId, location_id: RowId, change: ChangeDep) -> None:
    locations.delete_location(change, group_id=group_id, location_id=location_id)
    change.commit()


@router.get(
    "/{location_id}/effective",
    response_class=Response,
    responses={
        200: {"model": Envelope, "description": "the signed envelope, byte for byte as agents receive it"},
        **errors(404),
    },
)
def effective_document(group_id: RowId, location_id: RowId, session: SessionDep, _: ViewerDep) -> Response:
    """The signed effective configuration of (group, location), exactly as agents receive it."""
    locations.get_location(session, group_id=group_id, location_id=location_id)
    row = session.get(EffectiveConfig, (group_id, location_id))
    if row is None:
        raise NotFound(f"no effective document for group {group_id}, location {location_id}")
    return Response(row.envelope, media_type="application/json", headers={"ETag": f'"{row.serial}"'})
