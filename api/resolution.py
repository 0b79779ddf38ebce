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
from typing import Any

from sqlalchemy import Table, bindparam, insert, update
from sqlmodel import Session, col, delete, select

from fabric_core.canonical import canonical_json, sha256_hex
from fabric_core.signing import SigningKey
from manager_db.counters import allocate_serials
from manager_db.models import (
    Assignment,
    ContentRevision,
    EffectiveConfig,
    Group,
    Location,
    OutboxEntry,
    Policy,
    TrustedCa,
    utcnow,
)


@dataclass
class Tree:
    """Everything resolution needs, loaded in a handful of queries."""

    groups: dict[int, Group]
    children: dict[int | None, list[int]]
    locations: dict[int, list[Location]] = field(default_factory=dict)
    assignments: dict[int, list[Assignment]] = field(default_factory=dict)
    policies: dict[int, Policy] = field(default_factory=dict)
    content: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The current revision of every content kind, as documents name it."""
    trust: list[str] = field(default_factory=list)
    """The CA certificates (PEM) agents trust, oldest first, as documents name them."""

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
    trusted = select(TrustedCa).order_by(col(TrustedCa.added_at), col(TrustedCa.sha256))
    tree.trust = [ca.pem for ca in session.exec(trusted).all()]
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
        if tree.trust:
            body["trust"] = {"ca_certificates": tree.trust}
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


@dataclass(frozen=True, slots=True)
class Pending:
    """A document whose body changed (or is new), waiting for its serial."""

    group_id: int
    document: DocumentBody
    digest: str
    stored: bool
    """Whether the pair has a row in `effective_configs` already (updated) or not (inserted)."""


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
    # The keys and hashes only: the stored envelopes are not needed to tell what changed.
    existing: dict[tuple[int, int], str] = {
        (int(group_id), int(location_id)): digest
        for group_id, location_id, digest in session.execute(
            select(_EFFECTIVE.c.group_id, _EFFECTIVE.c.location_id, _EFFECTIVE.c.body_sha256).where(
                _EFFECTIVE.c.group_id.in_(targets)
            )
        ).all()
    }
    pending: list[Pending] = []
    for group_id in targets:
        for document in resolve_group(tree, group_id):
            digest = document.sha256
            stored = existing.pop((group_id, document.location_id), None)
            if stored != digest:
                pending.append(Pending(group_id, document, digest, stored is not None))
    removed = list(existing)
    by_group: dict[int, list[int]] = defaultdict(list)
    for group_id, location_id in removed:
        by_group[group_id].append(location_id)
    for group_id, location_ids in by_group.items():
        session.exec(
            delete(EffectiveConfig).where(
                col(EffectiveConfig.group_id) == group_id, col(EffectiveConfig.location_id).in_(location_ids)
            )
        )
    if removed:
        # An empty envelope tells the bridge to clear the retained document of a pair that is gone.
        now = utcnow()
        session.execute(
            insert(_OUTBOX),
            [
                {"group_id": g, "location_id": loc, "serial": 0, "envelope": b"", "created_at": now}
                for g, loc in removed
            ],
        )
    changed = _issue(session, signing_key=signing_key, pending=pending)
    session.flush()
    return RefreshResult(changed, removed)


_EFFECTIVE: Table = EffectiveConfig.__table__  # type: ignore[attr-defined]
_OUTBOX: Table = OutboxEntry.__table__  # type: ignore[attr-defined]
_UPDATE_EFFECTIVE = (
    update(_EFFECTIVE)
    .where(_EFFECTIVE.c.group_id == bindparam("key_group_id"))
    .where(_EFFECTIVE.c.location_id == bindparam("key_location_id"))
)


def _issue(
    session: Session, *, signing_key: SigningKey, pending: list[Pending]
) -> list[tuple[int, int, int]]:
    """Give each pending document a serial, sign it, store it and queue it for the bridge.

    Written in bulk, one statement per kind of write whatever the number of documents (executemany:
    the stored documents updated, the new ones inserted, the outbox rows inserted), with no ORM object
    per row. A `merge` and an ORM outbox row per document cost a SELECT and a flush each: a change at
    the root of 3,000 documents took about 4 s to its outbox that way (benchmark 5,
    `bench/resolution_scale.py`), and about 0.6 s this way.
    """
    if not pending:
        return []
    serials = allocate_serials(session, len(pending))
    now = utcnow()
    issued_at = now.isoformat().replace("+00:00", "Z")
    changed = []
    updates: list[dict[str, Any]] = []
    inserts: list[dict[str, Any]] = []
    outbox: list[dict[str, Any]] = []
    for serial, item in zip(serials, pending, strict=True):
        document = item.document
        location_id = document.location_id
        envelope = signing_key.sign_envelope({**document.body, "serial": serial, "issued_at": issued_at})
        values = {
            "is_default": document.is_default,
            "serial": serial,
            "body_sha256": item.digest,
            "heartbeat_s": document.heartbeat_s,
            "envelope": envelope,
            "updated_at": now,
        }
        if item.stored:
            updates.append({"key_group_id": item.group_id, "key_location_id": location_id, **values})
        else:
            inserts.append({"group_id": item.group_id, "location_id": location_id, **values})
        outbox.append(
            {
                "group_id": item.group_id,
                "location_id": location_id,
                "serial": serial,
                "envelope": envelope,
                "created_at": now,
            }
        )
        changed.append((item.group_id, location_id, serial))
    session.flush()  # whatever the caller left pending goes first, as it would have with ORM objects
    if updates:
        session.execute(_UPDATE_EFFECTIVE, updates)
        _expire_loaded(session, {(g, loc) for g, loc, _ in changed})
    if inserts:
        session.execute(insert(_EFFECTIVE), inserts)
    session.execute(insert(_OUTBOX), outbox)
    return changed


def _expire_loaded(session: Session, keys: set[tuple[int, int]]) -> None:
    """Documents this session loaded before they were rewritten: reload them on next access."""
    for instance in list(session.identity_map.values()):
        if isinstance(instance, EffectiveConfig) and (instance.group_id, instance.location_id) in keys:
            session.expire(instance)
