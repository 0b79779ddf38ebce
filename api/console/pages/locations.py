"""A group's **Manage Locations**: its locations (Default first) and the conditions by which an agent
decides where it is; **Add Location**, edit a location's name and conditions, delete one (never
Default). A group that inherits uses its owner's locations, shown read-only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlmodel import Session

from api.console.deps import ChangeDep, FormDep, OperatorDep
from api.console.forms import Fields, pretty_json
from api.console.rendering import SECURITY_HEADERS, render
from api.console.sessions import Operator
from api.deps import SessionDep
from api.errors import Conflict, Invalid, ServiceError
from api.params import RowId
from api.services import groups, locations
from api.services.change import Change
from manager_db.models import Location

router = APIRouter(prefix="/console/groups/{group_id}/locations")
DONE = {"created": "Location added.", "saved": "Location saved.", "deleted": "Location deleted."}
"""What a redirect after a change says (a fixed word in the query, never text of the operator's)."""
CONDITION_EXAMPLE = (
    '[{"type": "ip_range", "cidr": "10.1.0.0/16", "weight": 2},\n'
    ' {"type": "dns_server", "address": "10.1.0.53"}]'
)
CONDITION_TYPES = (
    ("ip_range", "cidr", "one of the host's addresses lies in the range"),
    ("dns_server", "address", "one of the host's DNS servers is the address"),
    ("gateway", "address", "the host's default gateway is the address"),
    ("network_type", "value", "ethernet, wireless or vpn"),
    ("fact", "name, equals or matches", "a fact the host reports equals a value or matches an RE2 pattern"),
    (
        "manager_reachable",
        "reachable",
        "the manager answers (true) or not (false); pair it with a network test",
    ),
)
"""The condition model of `fabric_core.wire.Condition`, as the page explains it."""


def _page(
    request: Request,
    session: Session,
    operator: Operator,
    group_id: int,
    *,
    fields: Fields | None = None,
    editing: int | None = None,
    status_code: int = 200,
    message: str | None = None,
    level: str = "info",
) -> Response:
    """The page; after a refused form, that form again with what was typed and its errors (`editing`:
    the location whose form it was, None for Add Location)."""
    group = groups.get_group(session, group_id=group_id)
    owner = locations.owner_of(session, group_id=group_id)
    found = locations.list_locations(session, group_id=group_id)
    # Default first (where an agent goes when nothing matches), then in the order they were added.
    ordered = sorted(found, key=lambda location: (not location.is_default, location.id or 0))
    shown: dict[int | None, dict[str, Any]] = {
        location.id: {"name": location.name, "conditions": pretty_json(location.conditions)}
        for location in ordered
    }
    shown[None] = {"name": "", "conditions": "[]"}
    errors: dict[int | None, dict[str, str]] = {}
    if fields is not None:
        shown[editing] = {**shown.get(editing, {}), **fields.values}
        errors[editing] = fields.errors
    parent = groups.get_group(session, group_id=group.parent_id) if group.parent_id is not None else None
    context = {
        "operator": operator,
        "section": "clients",
        "group": group,
        "parent": parent,
        "owner": owner,
        "locations": ordered,
        "editable": operator.can_change and not group.inherit,
        "shown": shown,
        "errors": errors,
        "example": CONDITION_EXAMPLE,
        "condition_types": CONDITION_TYPES,
        "message": message,
        "level": level,
    }
    return render(request, "locations.html", context, status_code=status_code)


def _done(group_id: int, what: str) -> Response:
    """After a change, the page again (Post/Redirect/Get: a reload changes nothing)."""
    return RedirectResponse(
        f"/console/groups/{group_id}/locations?done={what}", status_code=303, headers=SECURITY_HEADERS
    )


def _read(fields: Fields) -> tuple[str | None, list[dict[str, Any]] | None]:
    """The form's name and conditions, checked by the admin API's rules (refused at their fields)."""
    name = fields.name("name")
    raw = fields.json("conditions", expect=list, what="The conditions")
    conditions = None
    if raw is not None:
        try:
            conditions = locations.check_conditions(raw)
        except Invalid as refused:
            fields.refuse("conditions", refused.detail)
    return name, conditions


def _refused_at(fields: Fields, change: Change, refused: ServiceError) -> int:
    """A service's refusal at the field it concerns; the attempt forgotten. The status to answer."""
    change.session.rollback()
    fields.refuse("name" if isinstance(refused, Conflict) else "conditions", refused.detail)
    return refused.status_code


@router.get("", include_in_schema=False)
def locations_page(
    request: Request, group_id: RowId, operator: OperatorDep, session: SessionDep, done: str = ""
) -> Response:
    return _page(request, session, operator, group_id, message=DONE.get(done))


@router.post("", include_in_schema=False)
def add_location(
    request: Request, group_id: RowId, form: FormDep, change: ChangeDep, operator: OperatorDep
) -> Response:
    """**Add Location**: a name and its conditions (a JSON array; none: chosen only by hand)."""
    locations.require_own_state(change.session, group_id=group_id)
    fields = Fields(form)
    name, conditions = _read(fields)
    status_code = 422
    if fields.ok and name is not None and conditions is not None:
        try:
            locations.create_location(change, group_id=group_id, name=name, conditions=conditions)
            change.commit()
            return _done(group_id, "created")
        except (Conflict, Invalid) as refused:
            status_code = _refused_at(fields, change, refused)
    return _page(request, change.session, operator, group_id, fields=fields, status_code=status_code)


@router.post("/{location_id}", include_in_schema=False)
def save_location(
    request: Request,
    group_id: RowId,
    location_id: RowId,
    form: FormDep,
    change: ChangeDep,
    operator: OperatorDep,
) -> Response:
    """A location's name and conditions: agents of the group get a new document and choose again."""
    locations.require_own_state(change.session, group_id=group_id)
    locations.get_location(change.session, group_id=group_id, location_id=location_id)
    fields = Fields(form)
    name, conditions = _read(fields)
    status_code = 422
    if fields.ok and name is not None and conditions is not None:
        try:
            locations.update_location(
                change, group_id=group_id, location_id=location_id, name=name, conditions=conditions
            )
            change.commit()
            return _done(group_id, "saved")
        except (Conflict, Invalid) as refused:
            status_code = _refused_at(fields, change, refused)
    return _page(
        request,
        change.session,
        operator,
        group_id,
        fields=fields,
        editing=location_id,
        status_code=status_code,
    )


@router.post("/{location_id}/delete", include_in_schema=False)
def delete_location(
    request: Request, group_id: RowId, location_id: RowId, change: ChangeDep, operator: OperatorDep
) -> Response:
    """Delete a location (its location-specific assignments with it); the Default one cannot be."""
    location: Location = locations.get_location(change.session, group_id=group_id, location_id=location_id)
    try:
        locations.delete_location(change, group_id=group_id, location_id=location_id)
        change.commit()
    except Conflict as refused:
        change.session.rollback()
        message = f'Location "{location.name}" cannot be deleted: {refused.detail}'
        return _page(
            request, change.session, operator, group_id, status_code=409, message=message, level="error"
        )
    return _done(group_id, "deleted")
