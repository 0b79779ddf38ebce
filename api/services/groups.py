"""Groups: the tree, SEPM inheritance (copy on disable, discard on enable) and moves."""

from __future__ import annotations

from sqlmodel import Session, col, delete, func, select

from api.errors import Conflict, Invalid, NotFound
from api.resolution import load_tree
from api.services.change import Change
from fabric_core.text import name_key
from manager_db.models import (
    DEFAULT_LOCATION_NAME,
    ROOT_GROUP_NAME,
    Agent,
    Assignment,
    EffectiveConfig,
    EnrollmentToken,
    Group,
    Location,
    OutboxEntry,
)

COMMUNICATION_FIELDS = ("mode", "heartbeat_s", "download_enabled", "randomize_s")


def list_groups(session: Session) -> list[Group]:
    return list(session.exec(select(Group).order_by(col(Group.id))).all())


def get_group(session: Session, *, group_id: int) -> Group:
    group = session.get(Group, group_id)
    if group is None:
        raise NotFound(f"group {group_id} does not exist")
    return group


def get_root(session: Session) -> Group | None:
    return session.exec(select(Group).where(col(Group.parent_id).is_(None))).first()


def ensure_root(change: Change) -> Group:
    """Create `My Company` with its `Default` location on first start; return the root."""
    root = get_root(change.session)
    if root is not None:
        return root
    root = Group(name=ROOT_GROUP_NAME, parent_id=None, inherit=False)
    change.session.add(root)
    change.session.flush()
    assert root.id is not None
    change.session.add(Location(group_id=root.id, name=DEFAULT_LOCATION_NAME, is_default=True))
    change.audit("group.create", f"group:{root.id}", name=root.name, root=True)
    change.refresh([root.id])
    return root


def create_group(change: Change, *, name: str, parent_id: int, inherit: bool = True) -> Group:
    parent = change.session.get(Group, parent_id)
    if parent is None:
        raise Invalid(f"parent group {parent_id} does not exist")
    _require_unique_name(change.session, name=name, parent_id=parent_id, exclude=None)
    group = Group(name=name, parent_id=parent_id, inherit=True)
    change.session.add(group)
    change.session.flush()
    assert group.id is not None
    change.audit("group.create", f"group:{group.id}", name=name, parent_id=parent_id, inherit=inherit)
    if not inherit:
        _stop_inheriting(change, group)
    change.refresh([group.id])
    return group


def update_group(
    change: Change,
    *,
    group_id: int,
    name: str | None = None,
    parent_id: int | None = None,
    inherit: bool | None = None,
) -> Group:
    group = get_group(change.session, group_id=group_id)
    if parent_id is not None and parent_id != group.parent_id:
        _move(change, group, parent_id)
    if name is not None and name != group.name:
        _require_unique_name(change.session, name=name, parent_id=group.parent_id, exclude=group_id)
        change.audit("group.rename", f"group:{group_id}", old=group.name, new=name)
        group.name = name
    if inherit is not None and inherit != group.inherit:
        if group.parent_id is None:
            raise Conflict("the root group cannot inherit: it has no parent")
        if inherit:
            _start_inheriting(change, group)
        else:
            _stop_inheriting(change, group)
    change.session.add(group)
    change.refresh([group_id])
    return group


def delete_group(change: Change, *, group_id: int) -> None:
    group = get_group(change.session, group_id=group_id)
    if group.parent_id is None:
        raise Conflict("the root group cannot be deleted")
    session = change.session
    children = session.exec(select(func.count()).where(col(Group.parent_id) == group_id)).one()
    if children:
        raise Conflict(f"group {group_id} still has {children} child group(s): move or delete them first")
    agents = session.exec(
        select(func.count()).where(col(Agent.group_id) == group_id, col(Agent.revoked_at).is_(None))
    ).one()
    if agents:
        raise Conflict(f"group {group_id} still has {agents} agent(s): move or revoke them first")
    _discard_own_state(session, group_id)
    for document in session.exec(select(EffectiveConfig).where(col(EffectiveConfig.group_id) == group_id)):
        # An empty envelope tells the bridge to clear the group's retained documents on the broker.
        session.add(OutboxEntry(group_id=group_id, location_id=document.location_id, serial=0, envelope=b""))
    for table in (Agent, EnrollmentToken, EffectiveConfig):  # revoked agents and unused tokens go too
        session.exec(delete(table).where(col(table.group_id) == group_id))
    session.delete(group)
    change.audit("group.delete", f"group:{group_id}", name=group.name)
    session.flush()


def _require_unique_name(session: Session, *, name: str, parent_id: int | None, exclude: int | None) -> None:
    siblings = session.exec(select(Group).where(col(Group.parent_id) == parent_id)).all()
    for sibling in siblings:
        if sibling.id != exclude and name_key(sibling.name) == name_key(name):
            raise Conflict(f"a group named {name!r} already exists under group {parent_id}")


def _move(change: Change, group: Group, parent_id: int) -> None:
    assert group.id is not None
    if group.parent_id is None:
        raise Conflict("the root group cannot be moved")
    if change.session.get(Group, parent_id) is None:
        raise Invalid(f"parent group {parent_id} does not exist")
    tree = load_tree(change.session)
    if parent_id in tree.subtree(group.id):
        raise Conflict(f"moving group {group.id} under group {parent_id} would make a cycle")
    _require_unique_name(change.session, name=group.name, parent_id=parent_id, exclude=group.id)
    change.audit("group.move", f"group:{group.id}", old_parent_id=group.parent_id, new_parent_id=parent_id)
    group.parent_id = parent_id
    change.session.add(group)
    change.session.flush()


def copy_location(source: Location, *, group_id: int) -> Location:
    """A new location of `group_id` with `source`'s name, conditions and communication settings."""
    return Location(
        group_id=group_id,
        name=source.name,
        is_default=source.is_default,
        conditions=list(source.conditions),
        use_group_settings=source.use_group_settings,
        **{name: getattr(source, name) for name in COMMUNICATION_FIELDS},
    )


def _stop_inheriting(change: Change, group: Group) -> None:
    """Copy the parent's current effective state into the group, which then owns it."""
    assert group.id is not None and group.parent_id is not None
    session = change.session
    tree = load_tree(session)
    owner = tree.groups[tree.owner_id(group.parent_id)]
    for name in COMMUNICATION_FIELDS:
        setattr(group, name, getattr(owner, name))
    location_map: dict[int, int] = {}
    for source in tree.locations.get(owner.id or 0, []):
        copy = copy_location(source, group_id=group.id)
        session.add(copy)
        session.flush()
        assert source.id is not None and copy.id is not None
        location_map[source.id] = copy.id
    for source_assignment in tree.assignments.get(owner.id or 0, []):
        location_id = source_assignment.location_id
        session.add(
            Assignment(
                group_id=group.id,
                location_id=None if location_id is None else location_map[location_id],
                policy_type=source_assignment.policy_type,
                policy_id=source_assignment.policy_id,
            )
        )
    group.inherit = False
    change.audit("group.inherit_off", f"group:{group.id}", copied_from_group_id=owner.id)
    session.flush()


def _start_inheriting(change: Change, group: Group) -> None:
    """Discard the group's own locations, assignments and settings; use the parent's again."""
    assert group.id is not None
    _discard_own_state(change.session, group.id)
    group.inherit = True
    change.audit("group.inherit_on", f"group:{group.id}")
    change.session.flush()


def _discard_own_state(session: Session, group_id: int) -> None:
    session.exec(delete(Assignment).where(col(Assignment.group_id) == group_id))
    session.exec(delete(Location).where(col(Location.group_id) == group_id))
    session.flush()
