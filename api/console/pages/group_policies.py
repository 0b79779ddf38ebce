"""A group's **Policies** tab: "Inherit policies and settings from the parent group", the
**Location-independent Policies and Settings** (policies per type, **Communications Settings**) and the
**Location-specific Policies and Settings** of each location ("Use Group Communications Settings",
"Local - Push" / "Local - Pull")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlmodel import Session

from api.console import communication_form
from api.console.deps import ChangeDep, FormDep, OperatorDep
from api.console.group_view import group_context
from api.console.rendering import render
from api.console.sessions import Operator
from api.deps import FabricDep, SessionDep
from api.errors import Invalid
from api.fabric import Fabric
from api.params import RowId
from api.resolution import communication_of
from api.services import communication, groups, locations, policies
from api.services.change import Change
from manager_db.models import Group, Location, Policy

router = APIRouter(prefix="/console/groups/{group_id}")


@dataclass(frozen=True)
class LocationPane:
    location: Location
    use_group_settings: bool
    effective: dict[str, Any]
    assigned: dict[str, Policy]


def policies_context(session: Session, group: Group) -> dict[str, Any]:
    """What the Policies tab shows of a group (its owner's state, when it inherits)."""
    assert group.id is not None
    owner = locations.owner_of(session, group_id=group.id)
    every_policy = policies.list_policies(session)
    by_id = {policy.id: policy for policy in every_policy}
    assigned: dict[int | None, dict[str, Policy]] = {}
    for assignment in policies.assignments_of(session, group_id=group.id):
        assigned.setdefault(assignment.location_id, {})[assignment.policy_type] = by_id[assignment.policy_id]
    by_type: dict[str, list[Policy]] = {}
    for policy in every_policy:
        by_type.setdefault(policy.type, []).append(policy)
    group_settings = communication_of(owner)
    panes = [
        LocationPane(
            location=location,
            use_group_settings=location.use_group_settings,
            effective=group_settings if location.use_group_settings else communication_of(location),
            assigned=assigned.get(location.id, {}),
        )
        for location in locations.list_locations(session, group_id=group.id)
    ]
    return {
        "owner": owner,
        "group_settings": group_settings,
        "group_assigned": assigned.get(None, {}),
        "policies_by_type": dict(sorted(by_type.items())),
        "location_panes": panes,
    }


def _pane(
    request: Request, session: Session, fabric: Fabric, operator: Operator, group_id: int, **extra: Any
) -> Response:
    """The Policies tab again after a change, and the dialog closed (an out-of-band swap)."""
    group = groups.get_group(session, group_id=group_id)
    context = {
        "operator": operator,
        **group_context(session, fabric, group),
        **policies_context(session, group),
        "close_dialog": True,
        **extra,
    }
    return render(request, "_policies_pane.html", context)


def _committed(change: Change) -> None:
    change.commit()
    change.session.expire_all()  # the pane reads the state the change left, not the session's copies


@router.post("/inherit", include_in_schema=False)
def set_inherit(
    request: Request,
    group_id: RowId,
    form: FormDep,
    change: ChangeDep,
    operator: OperatorDep,
    fabric: FabricDep,
) -> Response:
    """The checkbox "Inherit policies and settings from the parent group": on discards the group's own
    state, off copies the parent's into it (DESIGN.md §1)."""
    inherit = form.get("inherit") == "on"
    groups.update_group(change, group_id=group_id, inherit=inherit)
    _committed(change)
    return _pane(request, change.session, fabric, operator, group_id)


@router.get("/communication", include_in_schema=False)
def group_dialog(request: Request, group_id: RowId, operator: OperatorDep, session: SessionDep) -> Response:
    group = groups.get_group(session, group_id=group_id)
    owner = communication.group_communication(session, group_id=group_id)
    return _dialog(
        request,
        operator,
        group.name,
        f"/console/groups/{group_id}/communication",
        communication_form.shown(communication_of(owner)),
    )


@router.post("/communication", include_in_schema=False)
def save_group_dialog(
    request: Request,
    group_id: RowId,
    form: FormDep,
    change: ChangeDep,
    operator: OperatorDep,
    fabric: FabricDep,
) -> Response:
    group = groups.get_group(change.session, group_id=group_id)
    settings, values = communication_form.read(form)
    if settings is None:
        return _dialog(
            request, operator, group.name, f"/console/groups/{group_id}/communication", values, refused=True
        )
    communication.set_group_communication(change, group_id=group_id, settings=settings)
    _committed(change)
    return _pane(
        request,
        change.session,
        fabric,
        operator,
        group_id,
        message=f"Communications Settings for {group.name} saved.",
    )


@router.post("/locations/{location_id}/use-group-settings", include_in_schema=False)
def use_group_settings(
    request: Request,
    group_id: RowId,
    location_id: RowId,
    form: FormDep,
    change: ChangeDep,
    operator: OperatorDep,
    fabric: FabricDep,
) -> Response:
    """Tasks → "Use Group Communications Settings": unchecked, the location starts from the group's
    settings as they are (so nothing changes until the operator edits "Local - Push/Pull")."""
    use_group = form.get("use_group_settings") == "on"
    settings: dict[str, Any] = {"use_group_settings": use_group}
    if not use_group:
        owner = locations.owner_of(change.session, group_id=group_id)
        settings.update(communication_of(owner))
    communication.set_location_communication(
        change, group_id=group_id, location_id=location_id, settings=settings
    )
    _committed(change)
    return _pane(request, change.session, fabric, operator, group_id)


@router.get("/locations/{location_id}/communication", include_in_schema=False)
def location_dialog(
    request: Request, group_id: RowId, location_id: RowId, operator: OperatorDep, session: SessionDep
) -> Response:
    location = locations.get_location(session, group_id=group_id, location_id=location_id)
    if location.use_group_settings:
        raise Invalid(
            f"location {location.name} uses the group's communications settings: uncheck "
            "Use Group Communications Settings first"
        )
    return _dialog(
        request,
        operator,
        location.name,
        f"/console/groups/{group_id}/locations/{location_id}/communication",
        communication_form.shown(communication_of(location)),
    )


@router.post("/locations/{location_id}/communication", include_in_schema=False)
def save_location_dialog(
    request: Request,
    group_id: RowId,
    location_id: RowId,
    form: FormDep,
    change: ChangeDep,
    operator: OperatorDep,
    fabric: FabricDep,
) -> Response:
    location = locations.get_location(change.session, group_id=group_id, location_id=location_id)
    action = f"/console/groups/{group_id}/locations/{location_id}/communication"
    settings, values = communication_form.read(form)
    if settings is None:
        return _dialog(request, operator, location.name, action, values, refused=True)
    communication.set_location_communication(
        change, group_id=group_id, location_id=location_id, settings={**settings, "use_group_settings": False}
    )
    _committed(change)
    message = f"Communications Settings for {location.name} saved."
    return _pane(request, change.session, fabric, operator, group_id, message=message)


@router.post("/assignments", include_in_schema=False)
def assign(
    request: Request,
    group_id: RowId,
    form: FormDep,
    change: ChangeDep,
    operator: OperatorDep,
    fabric: FabricDep,
) -> Response:
    """Assign a policy of a type to the group (no location) or to one of its locations; none: unassign."""
    policy_type = str(form.get("policy_type", ""))
    location_id = _optional_id(form.get("location_id"), "location")
    policy_id = _optional_id(form.get("policy_id"), "policy")
    if policy_id is None:
        policies.unassign_policy(change, group_id=group_id, location_id=location_id, policy_type=policy_type)
    else:
        policies.assign_policy(
            change, group_id=group_id, location_id=location_id, policy_type=policy_type, policy_id=policy_id
        )
    _committed(change)
    return _pane(
        request, change.session, fabric, operator, group_id, message=f"{policy_type} policy assignment saved."
    )


def _optional_id(value: object, what: str) -> int | None:
    text = str(value or "").strip()
    if not text:
        return None
    if not text.isdigit() or len(text) > 18:
        raise Invalid(f"{what} must be a row id")
    return int(text)


def _dialog(
    request: Request,
    operator: Operator,
    target_name: str,
    action: str,
    values: communication_form.DialogValues,
    *,
    refused: bool = False,
) -> Response:
    """The dialog "Communications Settings for <name>"; refused, it comes back in place with its errors."""
    headers = {"HX-Retarget": "#dialog", "HX-Reswap": "innerHTML"} if refused else None
    return render(
        request,
        "_communication_dialog.html",
        {"operator": operator, "target_name": target_name, "action": action, "values": values},
        status_code=422 if refused else 200,
        headers=headers,
    )
