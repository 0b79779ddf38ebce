"""Resolution of effective configurations: from groups, locations and policies to signed documents.

SEPM's inheritance: a group with `inherit` on uses the locations, assignments and communications
settings of its *owner*, the nearest ancestor-or-self with `inherit` off (the root never inherits). So a
change to a group can alter the documents of its whole subtree, and nothing outside it.

`refresh_documents` recomputes the documents of some subtrees inside the caller's change transaction;
only a document whose body changed gets a new serial and an outbox row. The body is everything but
`serial` and `issued_at`, so recomputing an unchanged state is a no-op.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session, col, delete, select

from api.db import allocate_serials
from api.models import Assignment, ContentRevision, EffectiveConfig, Group, Location, OutboxEntry, Policy
from fabric_core.canonical import canonical_json, sha256_hex
from fabric_core.signing import SigningKey


@dataclass
class Tree:
    """Everything resolution needs, loaded in four queries."""

    groups: dict[int, Group]
    children: dict[int | None, list[int]]
    locations: dict[int, list[Location]] = field(default_factory=dict)
    assignments: dict[int, list[Assignment]] = field(default_factory=dict)
    policies: dict[int, Policy] = field(default_factory=dict)
    content: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The current revision of every content kind, as documents name it."""

    def owner_id(self, group_id: int) -> int:
        group = self.groups[group_id]
        while group.inherit and group.parent_id is not None:
            group = self.groups[group.parent_id]
        assert group.id is not None
        return group.id

    def subtree(self, group_id: int) -> list[int]:
        """`group_id` and all its descendants, parents before children."""
        order, frontier = [], [group_id]
        while frontier:
            current = frontier.pop()
            order.append(current)
            frontier.extend(self.children.get(current, []))
        return order

    def ancestors(self, group_id: int) -> list[int]:
        chain, parent = [], self.groups[group_id].parent_id
        while parent is not None:
            chain.append(parent)
            parent = self.groups[parent].parent_id
        return chain


def load_tree(session: Session) -> Tree:
    groups = {g.id: g for g in session.exec(select(Group)).all() if g.id is not None}
    children: dict[int | None, list[int]] = defaultdict(list)
    for group_id, group in sorted(groups.items()):
        children[group.parent_id].append(group_id)
    tree = Tree(groups=groups, children=children)
    for location in session.exec(select(Location).order_by(col(Location.id))).all():
        tree.locations.setdefault(location.group_id, []).append(location)
    for assignment in session.exec(select(Assignment)).all():
        tree.assignments.setdefault(assignment.group_id, []).append(assignment)
    tree.policies = {p.id: p for p in session.exec(select(Policy)).all() if p.id is not None}
    for revision in session.exec(select(ContentRevision).order_by(col(ContentRevision.revision))).all():
        tree.content[revision.kind] = {
            "revision": revision.revision,
            "manifest_sha256": revision.manifest_sha256,
        }
    return tree


def communication_of(holder: Group | Location) -> dict[str, Any]:
    return {
        "mode": holder.mode,
        "heartbeat_s": holder.heartbeat_s,
        "download_enabled": holder.download_enabled,
        "randomize_s": holder.randomize_s,
    }


@dataclass(frozen=True)
class DocumentBody:
    """A document without serial and issued_at, and what the heartbeat cache needs to know of it."""

    location_id: int
    is_default: bool
    heartbeat_s: int
    body: dict[str, Any]

    @property
    def sha256(self) -> str:
        return sha256_hex(canonical_json(self.body))


def resolve_group(tree: Tree, group_id: int) -> list[DocumentBody]:
    """The document bodies of every (group, location) pair of one group."""
    owner_id = tree.owner_id(group_id)
    owner = tree.groups[owner_id]
    locations = tree.locations.get(owner_id, [])
    group_wide: dict[str, Assignment] = {}
    per_location: dict[int, dict[str, Assignment]] = defaultdict(dict)
    for assignment in tree.assignments.get(owner_id, []):
        if assignment.location_id is None:
            group_wide[assignment.policy_type] = assignment
        else:
            per_location[assignment.location_id][assignment.policy_type] = assignment
    listing = [
        {"id": loc.id, "name": loc.name, "is_default": loc.is_default, "conditions": loc.conditions}
        for loc in locations
    ]
    bodies = []
    for location in locations:
        assert location.id is not None
        communication = communication_of(owner if location.use_group_settings else location)
        policies = {
            policy_type: _policy_entry(tree, assignment, owner_id, "group")
            for policy_type, assignment in group_wide.items()
        }
        for policy_type, assignment in per_location[location.id].items():
            policies[policy_type] = _policy_entry(tree, assignment, owner_id, "location")
        body = {
            "group_id": group_id,
            "location_id": location.id,
            "communication": communication,
            "locations": listing,
            "policies": policies,
            "content": tree.content,
        }
        bodies.append(DocumentBody(location.id, location.is_default, communication["heartbeat_s"], body))
    return bodies


def _policy_entry(tree: Tree, assignment: Assignment, owner_id: int, scope: str) -> dict[str, Any]:
    policy = tree.policies[assignment.policy_id]
    return {
        "id": policy.id,
        "name": policy.name,
        "version": policy.version,
        "source_group_id": owner_id,
        "scope": scope,
        "body": policy.body,
    }


@dataclass(frozen=True)
class RefreshResult:
    changed: list[tuple[int, int, int]]
    """(group_id, location_id, serial) of every document that got a new serial."""
    removed: list[tuple[int, int]]


def refresh_documents(
    session: Session, *, signing_key: SigningKey, group_ids: Iterable[int] | None = None
) -> RefreshResult:
    """Recompute the documents of the subtrees of `group_ids` (all groups when None)."""
    session.flush()
    tree = load_tree(session)
    if group_ids is None:
        targets = list(tree.groups)
    else:
        seen: dict[int, None] = {}
        for group_id in group_ids:
            if group_id in tree.groups:
                seen.update(dict.fromkeys(tree.subtree(group_id)))
        targets = list(seen)
    if not targets:
        return RefreshResult([], [])
    existing = {
        (row.group_id, row.location_id): row
        for row in session.exec(
            select(EffectiveConfig).where(col(EffectiveConfig.group_id).in_(targets))
        ).all()
    }
    pending: list[tuple[int, DocumentBody, str]] = []
    for group_id in targets:
        for document in resolve_group(tree, group_id):
            digest = document.sha256
            row = existing.pop((group_id, document.location_id), None)
            if row is None or row.body_sha256 != digest:
                pending.append((group_id, document, digest))
    removed = list(existing)
    for group_id, location_id in removed:
        session.exec(
            delete(EffectiveConfig).where(
                col(EffectiveConfig.group_id) == group_id, col(EffectiveConfig.location_id) == location_id
            )
        )
        # An empty envelope tells the bridge to clear the retained document of a pair that is gone.
        session.add(OutboxEntry(group_id=group_id, location_id=location_id, serial=0, envelope=b""))
    changed = _issue(session, signing_key=signing_key, pending=pending)
    session.flush()
    return RefreshResult(changed, removed)


def _issue(
    session: Session, *, signing_key: SigningKey, pending: list[tuple[int, DocumentBody, str]]
) -> list[tuple[int, int, int]]:
    """Give each pending document a serial, sign it, store it and queue it for the bridge."""
    if not pending:
        return []
    serials = allocate_serials(session, len(pending))
    issued_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    changed = []
    for serial, (group_id, document, digest) in zip(serials, pending, strict=True):
        envelope = signing_key.sign_envelope({**document.body, "serial": serial, "issued_at": issued_at})
        session.merge(
            EffectiveConfig(
                group_id=group_id,
                location_id=document.location_id,
                is_default=document.is_default,
                serial=serial,
                body_sha256=digest,
                heartbeat_s=document.heartbeat_s,
                envelope=envelope,
            )
        )
        session.add(
            OutboxEntry(group_id=group_id, location_id=document.location_id, serial=serial, envelope=envelope)
        )
        changed.append((group_id, document.location_id, serial))
    return changed
