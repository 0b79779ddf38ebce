"""/api/v1/groups/{id}[/locations/{loc}]/communication: push or pull, heartbeat, download settings."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import ChangeDep, SessionDep, ViewerDep
from api.openapi import errors
from api.params import RowId
from api.resolution import communication_of
from api.schemas import CommunicationIn, CommunicationOut, LocationCommunicationIn, LocationCommunicationOut
from api.services import communication, locations
from fabric_core.wire import Communication
from manager_db.models import Group, Location

router = APIRouter(prefix="/groups/{group_id}", tags=["communication"])


def _group_out(group: Group) -> CommunicationOut:
    assert group.id is not None
    return CommunicationOut(group_id=group.id, **communication_of(group))


def _location_out(location: Location, owner: Group) -> LocationCommunicationOut:
    effective = communication_of(owner if location.use_group_settings else location)
    return LocationCommunicationOut(
        use_group_settings=location.use_group_settings,
        effective=Communication(**effective),
        **communication_of(location),
    )


@router.get("/communication", response_model=CommunicationOut, responses=errors(404))
def get_group_communication(group_id: RowId, session: SessionDep, _: ViewerDep) -> CommunicationOut:
    return _group_out(communication.group_communication(session, group_id=group_id))


@router.put("/communication", response_model=CommunicationOut, responses=errors(404, 409))
def set_group_communication(group_id: RowId, body: CommunicationIn, change: ChangeDep) -> CommunicationOut:
    """Change the fields given; the others keep their values."""
    group = communication.set_group_communication(
        change, group_id=group_id, settings=body.model_dump(exclude_none=True)
    )
    change.commit()
    return _group_out(group)


@router.get(
    "/locations/{location_id}/communication", response_model=LocationCommunicationOut, responses=errors(404)
)
def get_location_communication(
    group_id: RowId, location_id: RowId, session: SessionDep, _: ViewerDep
) -> LocationCommunicationOut:
    location = locations.get_location(session, group_id=group_id, location_id=location_id)
    return _location_out(location, locations.owner_of(session, group_id=group_id))


@router.put(
    "/locations/{location_id}/communication",
    response_model=LocationCommunicationOut,
    responses=errors(404, 409),
)
def set_location_communication(
    group_id: RowId, location_id: RowId, body: LocationCommunicationIn, change: ChangeDep
) -> LocationCommunicationOut:
    """Override the group's settings at one location (`use_group_settings: false`), or go back to them."""
    location = communication.set_location_communication(
        change, group_id=group_id, location_id=location_id, settings=body.model_dump(exclude_none=True)
    )
    owner = locations.owner_of(change.session, group_id=group_id)
    change.commit()
    return _location_out(location, owner)
