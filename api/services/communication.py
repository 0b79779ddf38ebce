"""Communications settings: per group, and per location when "use group settings" is off."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from api.services.change import Change
from api.services.locations import get_location, owner_of, require_own_state
from manager_db.models import Group, Location


def group_communication(session: Session, *, group_id: int) -> Group:
    """The group whose settings apply (the owner, when the group inherits)."""
    return owner_of(session, group_id=group_id)


def set_group_communication(change: Change, *, group_id: int, settings: dict[str, Any]) -> Group:
    group = require_own_state(change.session, group_id=group_id)
    for name, value in settings.items():
        setattr(group, name, value)
    change.session.add(group)
    change.audit("communication.set", f"group:{group_id}", **settings)
    change.refresh([group_id])
    return group


def set_location_communication(
    change: Change, *, group_id: int, location_id: int, settings: dict[str, Any]
) -> Location:
    require_own_state(change.session, group_id=group_id)
    location = get_location(change.session, group_id=group_id, location_id=location_id)
    for name, value in settings.items():
        setattr(location, name, value)
    change.session.add(location)
    change.audit("communication.set", f"location:{location_id}", group_id=group_id, **settings)
    change.refresh([group_id])
    return location
