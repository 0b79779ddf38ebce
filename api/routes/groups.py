"""/api/v1/groups: the group tree and inheritance."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import ChangeDep, SessionDep, ViewerDep
from api.openapi import errors
from api.params import RowId
from api.schemas import GroupCreate, GroupOut, GroupUpdate
from api.services import groups
from manager_db.models import Group

router = APIRouter(prefix="/groups", tags=["groups"])


def _out(group: Group) -> GroupOut:
    assert group.id is not None
    return GroupOut(id=group.id, name=group.name, parent_id=group.parent_id, inherit=group.inherit)


@router.get("", response_model=list[GroupOut])
def list_groups(session: SessionDep, _: ViewerDep) -> list[GroupOut]:
    return [_out(group) for group in groups.list_groups(session)]


@router.post("", response_model=GroupOut, status_code=status.HTTP_201_CREATED, responses=errors(409))
def create_group(body: GroupCreate, change: ChangeDep) -> GroupOut:
    group = groups.create_group(change, name=body.name, parent_id=body.parent_id, inherit=body.inherit)
    change.commit()
    return _out(group)


@router.get("/{group_id}", response_model=GroupOut, responses=errors(404))
def get_group(group_id: RowId, session: SessionDep, _: ViewerDep) -> GroupOut:
    return _out(groups.get_group(session, group_id=group_id))


@router.patch("/{group_id}", response_model=GroupOut, responses=errors(404, 409))
def update_group(group_id: RowId, body: GroupUpdate, change: ChangeDep) -> GroupOut:
    group = groups.update_group(
        change, group_id=group_id, name=body.name, parent_id=body.parent_id, inherit=body.inherit
    )
    change.commit()
    return _out(group)


@router.delete("/{group_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404, 409))
def delete_group(group_id: RowId, change: ChangeDep) -> None:
    groups.delete_group(change, group_id=group_id)
    change.commit()
