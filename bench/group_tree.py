"""Benchmark 5's tree: 1,000 groups filled breadth first (branching factor 10), inheritance off in every
group but the root, so that each owns its 3 locations and a copy of the root's firewall assignment, as
`PATCH /groups/{id} {inherit: false}` leaves them; and the firewall policy's body at each edit.

The root's locations and policy are made through the admin API; the rest in one change transaction with
the api's own models and resolution (bulk inserts, then `refresh_documents`): 4,000 HTTP calls would
measure the setup, not the change.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from sqlmodel import Session

from api.resolution import load_tree
from api.services.change import Change
from api.services.groups import COMMUNICATION_FIELDS, copy_location
from bench.console import say
from bench.scale_stack import WAIT_S, ScaleStack
from manager_db.models import Assignment, Group, Location

POLICY_NAME = "bench-scale-firewall"
EXTRA_LOCATIONS = (
    ("Office", [{"type": "ip_range", "cidr": "10.20.0.0/16", "weight": 10}]),
    ("Remote", [{"type": "network_type", "value": "vpn", "weight": 5}]),
)


def firewall_body(edit: int) -> dict[str, Any]:
    """The policy's body at each edit: the same size every time, a different rule set."""
    return {
        "default": "deny",
        "edit": edit,
        "allow": [{"port": 443 + (edit + i) % 7, "proto": "tcp", "to": f"10.{i}.0.0/16"} for i in range(8)],
    }


def tree_levels(groups: int, branching: int) -> list[int]:
    """Groups per depth of a tree of `groups` filled breadth first, each parent with `branching` children."""
    levels, left = [1], groups - 1
    while left > 0:
        width = min(levels[-1] * branching, left)
        levels.append(width)
        left -= width
    return levels


def build_tree(stack: ScaleStack, *, groups: int, branching: int) -> dict[str, Any]:
    """The root's locations and policy through the admin API; the rest in one change transaction."""
    began = time.monotonic()
    root = next(g for g in stack.call("GET", "/groups") if g["parent_id"] is None)
    for name, conditions in EXTRA_LOCATIONS:
        stack.call("POST", f"/groups/{root['id']}/locations", json={"name": name, "conditions": conditions})
    policy = stack.call(
        "POST", "/policies", json={"name": POLICY_NAME, "type": "firewall", "body": firewall_body(0)}
    )
    stack.call("PUT", f"/groups/{root['id']}/policies/firewall", json={"policy_id": policy["id"]})
    levels = tree_levels(groups, branching)
    say(f"making {groups} groups (levels {levels}), each with its own {1 + len(EXTRA_LOCATIONS)} locations")
    before = stack.last_outbox_id()
    fabric = stack.manager.fabric if stack.manager is not None else None
    assert fabric is not None
    with Session(fabric.engine, expire_on_commit=False) as session:
        change = Change(
            session=session, actor="bench", signing_key=fabric.signing_key, after_commit=fabric.view.refresh
        )
        _insert_tree(change, root_id=int(root["id"]), levels=levels, branching=branching)
        inserted = time.monotonic()
        refreshed = change.refresh([int(root["id"])])
        change.commit()
    resolved = time.monotonic()
    say(f"tree stored in {inserted - began:.1f}s; {len(refreshed.changed)} documents issued")
    rows = stack.wait_outbox_published(before, timeout=WAIT_S + groups * 0.1)
    documents = stack.current_documents_by_topic()
    sizes = [len(body) for body in documents.values()]
    setup = {
        "policy_id": int(policy["id"]),
        "root_group_id": int(root["id"]),
        "groups": groups,
        "branching": branching,
        "levels": levels,
        "locations_per_group": 1 + len(EXTRA_LOCATIONS),
        "documents": len(documents),
        "envelope_bytes": {"min": min(sizes), "median": int(statistics.median(sizes)), "max": max(sizes)},
        "insert_s": round(inserted - began, 2),
        "first_resolution_s": round(resolved - inserted, 2),
        "first_publication_rows": len(rows),
        "setup_s": round(time.monotonic() - began, 2),
    }
    say(f"first publication of {len(rows)} documents done; setup took {setup['setup_s']}s")
    return setup


def _insert_tree(change: Change, *, root_id: int, levels: list[int], branching: int) -> None:
    """Every group below the root, owning a copy of the root's state (what `inherit: false` copies)."""
    session = change.session
    tree = load_tree(session)
    root = tree.groups[root_id]
    sources = tree.locations[root_id]
    assignments = tree.assignments.get(root_id, [])
    communication = {name: getattr(root, name) for name in COMMUNICATION_FIELDS}
    parents = [root_id]
    for depth, width in enumerate(levels[1:], start=1):
        made = [
            Group(
                name=f"bench-{depth}-{index}",
                parent_id=parents[index // branching],
                inherit=False,
                **communication,
            )
            for index in range(width)
        ]
        session.add_all(made)
        session.flush()
        copies: list[tuple[Group, Location, Location]] = []
        for group in made:
            assert group.id is not None
            for source in sources:
                copies.append((group, source, copy_location(source, group_id=group.id)))
        session.add_all([copy for _, _, copy in copies])
        session.flush()
        location_map = {(g.id, s.id): c.id for g, s, c in copies}
        session.add_all(
            [
                Assignment(
                    group_id=group.id,
                    location_id=None
                    if assignment.location_id is None
                    else location_map[(group.id, assignment.location_id)],
                    policy_type=assignment.policy_type,
                    policy_id=assignment.policy_id,
                )
                for group in made
                if group.id is not None
                for assignment in assignments
            ]
        )
        session.flush()
        say(f"level {depth}: {width} groups, {len(copies)} locations")
        parents = [group.id for group in made if group.id is not None]
    change.audit("bench.tree", f"group:{root_id}", groups=sum(levels), levels=levels)
