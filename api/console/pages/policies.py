"""**Policies**: the shared policies listed by type, **Add a policy**, **Edit the policy** (name and JSON
body) and **Delete the policy**. Assigning one is done per group and location, on the group's Policies
tab (`api.console.pages.group_policies`), which this page links to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import TypeAdapter, ValidationError
from sqlmodel import Session

from api.console.deps import ChangeDep, FormDep, OperatorDep
from api.console.forms import Fields, pretty_json
from api.console.rendering import SECURITY_HEADERS, render
from api.console.sessions import Operator
from api.deps import SessionDep
from api.errors import Conflict, Invalid, ServiceError
from api.params import RowId
from api.schemas import PolicyType
from api.services import groups, policies
from manager_db.models import Group, Policy

router = APIRouter(prefix="/console/policies")
SUGGESTED_TYPES = ("antivirus", "firewall", "intrusion_prevention", "liveupdate", "application_control")
"""SEPM's policy types, offered in the type field's list; any name by the admin API's rule is taken."""
DONE = {"created": "Policy added.", "saved": "Policy saved.", "deleted": "Policy deleted."}
"""What a redirect after a change says (a fixed word in the query, never text of the operator's)."""
_POLICY_TYPE = TypeAdapter(PolicyType)


@dataclass(frozen=True)
class PolicyRow:
    policy: Policy
    groups: list[Group]
    """The groups that have it assigned (to the group or one of its locations)."""


def _rows(session: Session, every: list[Policy]) -> list[PolicyRow]:
    by_id = {group.id: group for group in groups.list_groups(session)}
    rows = []
    for policy in every:
        assert policy.id is not None
        using = policies.groups_using(session, policy_id=policy.id)
        rows.append(PolicyRow(policy, [by_id[group_id] for group_id in using if group_id in by_id]))
    return rows


def _list_page(
    request: Request,
    session: Session,
    operator: Operator,
    *,
    fields: Fields | None = None,
    status_code: int = 200,
    message: str | None = None,
    level: str = "info",
) -> Response:
    rows = _rows(session, policies.list_policies(session))
    by_type: dict[str, list[PolicyRow]] = {}
    for row in rows:
        by_type.setdefault(row.policy.type, []).append(row)
    values = fields.values if fields else {"name": "", "type": "", "body": "{}"}
    context = {
        "operator": operator,
        "section": "policies",
        "by_type": dict(sorted(by_type.items())),
        "types": sorted({*SUGGESTED_TYPES, *by_type}),
        "values": values,
        "errors": fields.errors if fields else {},
        "message": message,
        "level": level,
    }
    return render(request, "policies.html", context, status_code=status_code)


def _edit_page(
    request: Request,
    session: Session,
    operator: Operator,
    policy: Policy,
    *,
    fields: Fields | None = None,
    status_code: int = 200,
    message: str | None = None,
    level: str = "info",
) -> Response:
    [row] = _rows(session, [policy])
    values = fields.values if fields else {"name": policy.name, "body": pretty_json(policy.body)}
    context = {
        "operator": operator,
        "section": "policies",
        "row": row,
        "values": values,
        "errors": fields.errors if fields else {},
        "message": message,
        "level": level,
    }
    return render(request, "policy.html", context, status_code=status_code)


def _done(path: str, what: str) -> Response:
    """After a change, to a page that shows the result (Post/Redirect/Get: a reload changes nothing)."""
    return RedirectResponse(f"{path}?done={what}", status_code=303, headers=SECURITY_HEADERS)


def _refused_at(fields: Fields, refused: ServiceError) -> None:
    """A service's refusal at the field it concerns: the name clashes (Conflict), or the body is not
    what the manager can sign and store (Invalid)."""
    fields.refuse("name" if isinstance(refused, Conflict) else "body", refused.detail)


@router.get("", include_in_schema=False)
def policies_page(request: Request, operator: OperatorDep, session: SessionDep, done: str = "") -> Response:
    return _list_page(request, session, operator, message=DONE.get(done))


@router.post("", include_in_schema=False)
def add_policy(request: Request, form: FormDep, change: ChangeDep, operator: OperatorDep) -> Response:
    """**Add a policy**: a name, a type and a body (a JSON object)."""
    fields = Fields(form)
    name = fields.name("name")
    policy_type = fields.text("type", max_length=64).strip()
    try:
        _POLICY_TYPE.validate_python(policy_type)
    except ValidationError:
        fields.refuse("type", "Type: lowercase letters, digits and _, starting with a letter (at most 32)")
    body = fields.json("body", expect=dict, what="The policy body")
    status_code = 422
    if fields.ok and name is not None:
        try:
            policies.create_policy(change, name=name, policy_type=policy_type, body=body)
            change.commit()
            return _done("/console/policies", "created")
        except (Conflict, Invalid) as refused:
            change.session.rollback()
            _refused_at(fields, refused)
            status_code = refused.status_code
    return _list_page(request, change.session, operator, fields=fields, status_code=status_code)


@router.get("/{policy_id}", include_in_schema=False)
def policy_page(
    request: Request, policy_id: RowId, operator: OperatorDep, session: SessionDep, done: str = ""
) -> Response:
    policy = policies.get_policy(session, policy_id=policy_id)
    return _edit_page(request, session, operator, policy, message=DONE.get(done))


@router.post("/{policy_id}", include_in_schema=False)
def save_policy(
    request: Request, policy_id: RowId, form: FormDep, change: ChangeDep, operator: OperatorDep
) -> Response:
    """**Edit the policy**: every group and location that uses it gets a new document."""
    policy = policies.get_policy(change.session, policy_id=policy_id)
    fields = Fields(form)
    name = fields.name("name")
    body: dict[str, Any] | None = fields.json("body", expect=dict, what="The policy body")
    status_code = 422
    if fields.ok:
        try:
            policies.update_policy(change, policy_id=policy_id, name=name, body=body)
            change.commit()
            return _done(f"/console/policies/{policy_id}", "saved")
        except (Conflict, Invalid) as refused:
            # The service may have set the name before it refused the body: forget the whole attempt.
            change.session.rollback()
            _refused_at(fields, refused)
            status_code = refused.status_code
            policy = policies.get_policy(change.session, policy_id=policy_id)
    return _edit_page(request, change.session, operator, policy, fields=fields, status_code=status_code)


@router.post("/{policy_id}/delete", include_in_schema=False)
def delete_policy(request: Request, policy_id: RowId, change: ChangeDep, operator: OperatorDep) -> Response:
    """**Delete the policy**: refused while a group uses it (unassign it on those groups' Policies tab)."""
    policy = policies.get_policy(change.session, policy_id=policy_id)
    try:
        policies.delete_policy(change, policy_id=policy_id)
        change.commit()
    except Conflict:
        change.session.rollback()
        policy = policies.get_policy(change.session, policy_id=policy_id)
        [row] = _rows(change.session, [policy])
        names = ", ".join(f'"{group.name}"' for group in row.groups)
        message = f'Policy "{policy.name}" cannot be deleted: it is assigned to {names}. Unassign it first.'
        return _edit_page(
            request, change.session, operator, policy, status_code=409, message=message, level="error"
        )
    return _done("/console/policies", "deleted")
