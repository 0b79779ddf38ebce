"""/api/v1/policies and their assignment: /api/v1/groups/{id}[/locations/{loc}]/policies/{type}."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import ChangeDep, SessionDep, ViewerDep
from api.openapi import errors
from api.params import RowId
from api.schemas import AssignmentIn, AssignmentOut, PolicyCreate, PolicyOut, PolicyType, PolicyUpdate
from api.services import policies
from manager_db.models import Assignment, Policy

router = APIRouter(tags=["policies"])


def _out(policy: Policy) -> PolicyOut:
    assert policy.id is not None
    return PolicyOut(
        id=policy.id, name=policy.name, type=policy.type, version=policy.version, body=policy.body
    )


def _assignment(assignment: Assignment) -> AssignmentOut:
    return AssignmentOut(
        group_id=assignment.group_id,
        location_id=assignment.location_id,
        type=assignment.policy_type,
        policy_id=assignment.policy_id,
    )


@router.get("/policies", response_model=list[PolicyOut])
def list_policies(session: SessionDep, _: ViewerDep, type: PolicyType | None = None) -> list[PolicyOut]:
    return [_out(p) for p in policies.list_policies(session, policy_type=type)]


@router.post(
    "/policies", response_model=PolicyOut, status_code=status.HTTP_201_CREATED, responses=errors(409)
)
def create_policy(body: PolicyCreate, change: ChangeDep) -> PolicyOut:
    policy = policies.create_policy(change, name=body.name, policy_type=body.type, body=body.body)
    change.commit()
    return _out(policy)


@router.get("/policies/{policy_id}", response_model=PolicyOut, responses=errors(404))
def get_policy(policy_id: RowId, session: SessionDep, _: ViewerDep) -> PolicyOut:
    return _out(policies.get_policy(session, policy_id=policy_id))


@router.put("/policies/{policy_id}", response_model=PolicyOut, responses=errors(404, 409))
def update_policy(policy_id: RowId, body: PolicyUpdate, change: ChangeDep) -> PolicyOut:
    """Edit a shared policy: every group and location that uses it gets a new document."""
    policy = policies.update_policy(change, policy_id=policy_id, name=body.name, body=body.body)
    change.commit()
    return _out(policy)


@router.delete("/policies/{policy_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 409))
def delete_policy(policy_id: RowId, change: ChangeDep) -> None:
    policies.delete_policy(change, policy_id=policy_id)
    change.commit()


@router.put(
    "/groups/{group_id}/policies/{policy_type}", response_model=AssignmentOut, responses=errors(404, 409)
)
def assign_group_policy(
    group_id: RowId, policy_type: PolicyType, body: AssignmentIn, change: ChangeDep
) -> AssignmentOut:
    """Apply a policy to the whole group (location-independent)."""
    assignment = policies.assign_policy(
        change, group_id=group_id, location_id=None, policy_type=policy_type, policy_id=body.policy_id
    )
    change.commit()
    return _assignment(assignment)


@router.delete(
    "/groups/{group_id}/policies/{policy_type}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(404, 409),
)
def unassign_group_policy(group_id: RowId, policy_type: PolicyType, change: ChangeDep) -> None:
    policies.unassign_policy(change, group_id=group_id, location_id=None, policy_type=policy_type)
    change.commit()


@router.put(
    "/groups/{group_id}/locations/{location_id}/policies/{policy_type}",
    response_model=AssignmentOut,
    responses=errors(404, 409),
)
def assign_location_policy(
    group_id: RowId, location_id: RowId, policy_type: PolicyType, body: AssignmentIn, change: ChangeDep
) -> AssignmentOut:
    """Apply a policy to one location of the group; it overrides a group-wide policy of the same type."""
    assignment = policies.assign_policy(
        change, group_id=group_id, location_id=location_id, policy_type=policy_type, policy_id=body.policy_id
    )
    change.commit()
    return _assignment(assignment)


@router.delete(
    "/groups/{group_id}/locations/{location_id}/policies/{policy_type}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(404, 409),
)
def unassign_location_policy(
    group_id: RowId, location_id: RowId, policy_type: PolicyType, change: ChangeDep
) -> None:
    policies.unassign_policy(change, group_id=group_id, location_id=location_id, policy_type=policy_type)
    change.commit()
