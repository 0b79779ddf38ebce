"""Policies (shared, typed JSON bodies) and their assignment to groups and locations."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from api.errors import Conflict, Invalid, NotFound
from api.services.change import Change
from api.services.locations import get_location, owner_of, require_own_state
from fabric_core.canonical import PLAIN_JSON, canonical_json, is_plain_json
from manager_db.models import Assignment, Policy, utcnow


def list_policies(session: Session, *, policy_type: str | None = None) -> list[Policy]:
    query = select(Policy).order_by(col(Policy.id))
    if policy_type is not None:
        query = query.where(col(Policy.type) == policy_type)
    return list(session.exec(query).all())


def get_policy(session: Session, *, policy_id: int) -> Policy:
    policy = session.get(Policy, policy_id)
    if policy is None:
        raise NotFound(f"policy {policy_id} does not exist")
    return policy


def create_policy(change: Change, *, name: str, policy_type: str, body: dict[str, Any]) -> Policy:
    _require_unique_name(change.session, name=name, exclude=None)
    _require_encodable(body)
    policy = Policy(name=name, type=policy_type, body=body, version=1)
    change.session.add(policy)
    change.session.flush()
    change.audit("policy.create", f"policy:{policy.id}", name=name, type=policy_type)
    return policy


def update_policy(
    change: Change, *, policy_id: int, name: str | None = None, body: dict[str, Any] | None = None
) -> Policy:
    """Edit a shared policy: every group that uses it gets new documents. No real change, no new version."""
    policy = get_policy(change.session, policy_id=policy_id)
    changed = False
    if name is not None and name != policy.name:
        _require_unique_name(change.session, name=name, exclude=policy_id)
        policy.name = name
        changed = True
    if body is not None:
        _require_encodable(body)  # before comparing: canonical_json raises on what it cannot encode
    if body is not None and canonical_json(body) != canonical_json(policy.body):
        policy.body = body
        changed = True
    if changed:
        policy.version += 1
        policy.updated_at = utcnow()
        change.session.add(policy)
        change.audit("policy.update", f"policy:{policy_id}", version=policy.version)
        change.refresh(groups_using(change.session, policy_id=policy_id))
    return policy


def delete_policy(change: Change, *, policy_id: int) -> None:
    policy = get_policy(change.session, policy_id=policy_id)
    users = groups_using(change.session, policy_id=policy_id)
    if users:
        raise Conflict(f"policy {policy_id} is assigned to group(s) {users}: unassign it first")
    change.session.delete(policy)
    change.audit("policy.delete", f"policy:{policy_id}", name=policy.name)


def groups_using(session: Session, *, policy_id: int) -> list[int]:
    rows = session.exec(select(Assignment.group_id).where(col(Assignment.policy_id) == policy_id)).all()
    return sorted(set(rows))


def assignments_of(session: Session, *, group_id: int) -> list[Assignment]:
    """The assignments that apply to `group_id`: its own, or its owner's when it inherits."""
    owner = owner_of(session, group_id=group_id)
    return list(
        session.exec(
            select(Assignment)
            .where(col(Assignment.group_id) == owner.id)
            .order_by(col(Assignment.policy_type))
        ).all()
    )


def assign_policy(
    change: Change, *, group_id: int, location_id: int | None, policy_type: str, policy_id: int
) -> Assignment:
    require_own_state(change.session, group_id=group_id)
    if location_id is not None:
        get_location(change.session, group_id=group_id, location_id=location_id)
    policy = change.session.get(Policy, policy_id)
    if policy is None:
        raise Invalid(f"policy {policy_id} does not exist")
    if policy.type != policy_type:
        raise Invalid(f"policy {policy_id} is a {policy.type!r} policy, not {policy_type!r}")
    assignment = _find(change.session, group_id=group_id, location_id=location_id, policy_type=policy_type)
    if assignment is None:
        assignment = Assignment(
            group_id=group_id, location_id=location_id, policy_type=policy_type, policy_id=0
        )
    assignment.policy_id = policy_id
    change.session.add(assignment)
    change.audit(
        "policy.assign", f"group:{group_id}", location_id=location_id, type=policy_type, policy_id=policy_id
    )
    change.refresh([group_id])
    return assignment


def unassign_policy(change: Change, *, group_id: int, location_id: int | None, policy_type: str) -> None:
    require_own_state(change.session, group_id=group_id)
    if location_id is not None:
        get_location(change.session, group_id=group_id, location_id=location_id)
    assignment = _find(change.session, group_id=group_id, location_id=location_id, policy_type=policy_type)
    if assignment is None:
        where = f"location {location_id} of group {group_id}" if location_id else f"group {group_id}"
        raise NotFound(f"no {policy_type!r} policy is assigned to {where}")
    change.session.delete(assignment)
    change.audit("policy.unassign", f"group:{group_id}", location_id=location_id, type=policy_type)
    change.refresh([group_id])


def _find(session: Session, *, group_id: int, location_id: int | None, policy_type: str) -> Assignment | None:
    location_test = (
        col(Assignment.location_id).is_(None)
        if location_id is None
        else col(Assignment.location_id) == location_id
    )
    return session.exec(
        select(Assignment).where(
            col(Assignment.group_id) == group_id, location_test, col(Assignment.policy_type) == policy_type
        )
    ).first()


def _require_unique_name(session: Session, *, name: str, exclude: int | None) -> None:
    other = session.exec(select(Policy).where(col(Policy.name) == name)).first()
    if other is not None and other.id != exclude:
        raise Conflict(f"a policy named {name!r} already exists (id {other.id})")


def _require_encodable(body: dict[str, Any]) -> None:
    if not is_plain_json(body):
        raise Invalid(f"policy body must be {PLAIN_JSON}")
