"""Locations of a group. A group that inherits shows its owner's locations and may not change them."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlmodel import Session, col, delete, select

from api.errors import Conflict, Invalid, NotFound
from api.resolution import load_tree
from api.services.change import Change
from api.services.groups import get_group
from fabric_core.text import name_key
from fabric_core.wire import Condition
from manager_db.models import Assignment, Group, Location

_CONDITIONS = TypeAdapter(list[Condition])


def owner_of(session: Session, *, group_id: int) -> Group:
    """The group whose locations, assignments and settings apply to `group_id`."""
    get_group(session, group_id=group_id)
    tree = load_tree(session)
    return tree.groups[tree.owner_id(group_id)]


def require_own_state(session: Session, *, group_id: int) -> Group:
    """The group itself, if it owns its state; `Conflict` if it inherits."""
    group = get_group(session, group_id=group_id)
    if group.inherit:
        raise Conflict(
            f"group {group_id} inherits policies and settings from its parent: "
            "turn inheritance off (PATCH inherit=false) before changing them"
        )
    return group


def list_locations(session: Session, *, group_id: int) -> list[Location]:
    owner = owner_of(session, group_id=group_id)
    return list(
        session.exec(
            select(Location).where(col(Location.group_id) == owner.id).order_by(col(Location.id))
        ).all()
    )


def get_location(session: Session, *, group_id: int, location_id: int) -> Location:
    """A location that applies to `group_id` (its own, or its owner's when it inherits)."""
    owner = owner_of(session, group_id=group_id)
    location = session.get(Location, location_id)
    if location is None or location.group_id != owner.id:
        raise NotFound(f"location {location_id} is not a location of group {group_id}")
    return location


def check_conditions(value: object) -> list[dict[str, Any]]:
    """Conditions as the admin API takes them (`api.schemas.LocationCreate`: `fabric_core.wire.Condition`,
    strict), ready to store; `Invalid` naming the first refused condition and field otherwise. For callers
    that get conditions as parsed JSON rather than through the request model (the console)."""
    try:
        conditions = _CONDITIONS.validate_python(value, strict=True)
    except ValidationError as refused:
        first = refused.errors()[0]
        where = [str(part) for part in first["loc"]]
        if where and where[0].isdigit():
            where[0] = f"condition {int(where[0]) + 1}"
        reason = str(first["msg"]).removeprefix("Value error, ")
        raise Invalid(f"{', '.join(where) or 'conditions'}: {reason}") from refused
    return [condition.model_dump(exclude_none=True) for condition in conditions]


def create_location(
    change: Change, *, group_id: int, name: str, conditions: list[dict[str, Any]]
) -> Location:
    require_own_state(change.session, group_id=group_id)
    _require_unique_name(change.session, group_id=group_id, name=name, exclude=None)
    location = Location(group_id=group_id, name=name, is_default=False, conditions=conditions)
    change.session.add(location)
    change.session.flush()
    change.audit("location.create", f"location:{location.id}", group_id=group_id, name=name)
    change.refresh([group_id])
    return location


def update_location(
    change: Change,
    *,
    group_id: int,
    location_id: int,
    name: str | None = None,
    conditions: list[dict[str, Any]] | None = None,
) -> Location:
    require_own_state(change.session, group_id=group_id)
    location = get_location(change.session, group_id=group_id, location_id=location_id)
    if name is not None and name != location.name:
        _require_unique_name(change.session, group_id=group_id, name=name, exclude=location_id)
        location.name = name
    if conditions is not None:
        location.conditions = conditions
    change.session.add(location)
    change.audit("location.update", f"location:{location_id}", name=name, conditions=conditions)
    change.refresh([group_id])
    return location


def delete_location(change: Change, *, group_id: int, location_id: int) -> None:
    require_own_state(change.session, group_id=group_id)
    location = get_location(change.session, group_id=group_id, location_id=location_id)
    if location.is_default:
        raise Conflict("the Default location cannot be deleted: it is where agents go when nothing matches")
    change.session.exec(delete(Assignment).where(col(Assignment.location_id) == location_id))
    change.session.delete(location)
    change.audit("location.delete", f"location:{location_id}", group_id=group_id, name=location.name)
    change.refresh([group_id])


def _require_unique_name(session: Session, *, group_id: int, name: str, exclude: int | None) -> None:
    for other in session.exec(select(Location).where(col(Location.group_id) == group_id)).all():
        if other.id != exclude and name_key(other.name) == name_key(name):
            raise Conflict(f"group {group_id} already has a location named {name!r}")
