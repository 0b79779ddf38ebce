"""The frame around a selected group: the group tree on the left, the group and its parent."""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session

from api.fabric import Fabric
from api.services import groups
from api.services.overview import GroupRow, group_tree
from manager_db.models import Group


@dataclass(frozen=True)
class TreeNode:
    row: GroupRow
    depth: int


def tree_nodes(fabric: Fabric) -> list[TreeNode]:
    """The group tree, parents first, each with its depth for the indented list."""
    rows = group_tree(fabric.engine)
    depth: dict[int, int] = {}
    nodes = []
    for row in rows:
        depth[row.id] = 0 if row.parent_id is None else depth.get(row.parent_id, 0) + 1
        nodes.append(TreeNode(row, depth[row.id]))
    return nodes


def selected_group(session: Session, group_id: int | None) -> Group:
    if group_id is not None:
        return groups.get_group(session, group_id=group_id)
    root = groups.get_root(session)
    assert root is not None, "the manager makes the root group at its first start"
    return root


def group_context(session: Session, fabric: Fabric, group: Group) -> dict[str, object]:
    """What every tab of a selected group shows around itself: the tree, the group, its parent."""
    parent = groups.get_group(session, group_id=group.parent_id) if group.parent_id is not None else None
    return {"section": "clients", "tree": tree_nodes(fabric), "group": group, "parent": parent}
