"""Benchmark 5, resolution at scale: one change at the root of 1,000 groups x 3 locations, to the broker.

A tree of 1,000 groups (the root `My Company` and 999 below it, branching factor 10: levels of 1, 10,
100 and 889 groups) where every group but the root has inheritance turned off, so each owns its 3
locations (`Default`, `Office` with an IP-range condition, `Remote` with a network-type condition) and a
copy of the root's assignment of one firewall policy, as `PATCH /groups/{id} {inherit: false}` leaves
them: 3,000 (group, location) documents that all name the policy. The tree is made in one change
transaction with the api's own models and resolution (bulk inserts, then `refresh_documents`): 4,000
HTTP calls would measure the setup, not the change. The stack is `policycast up`'s (`bench.stack.Stack`:
Mosquitto with Policycast's configuration, the manager on uvicorn, the bridge on a thread), on SQLite in a
temporary directory, or on a throw-away PostgreSQL database with `--database-url`.

Measured per round: the operator edits the policy's body through the admin API (`PUT /policies/{id}`):

- time to outbox: from sending the request to its response: the 3,000 documents resolved, signed, their
  serials reserved and their outbox rows committed (and this process's heartbeat view refreshed);
- time to last PUBACK: from sending the request to the latest `published_at` of the change's outbox
  rows (the bridge marks a batch of rows only after the broker acknowledged every message of it);
- time to last delivery: from sending the request to the moment a wildcard subscriber (another process,
  its own broker account reading every config topic) received the last of the 3,000 new documents; each
  is checked: the new serial, a valid signature, its own topic's group and location, the new version.

Baseline, in the same run, on the same broker: the same 3,000 current envelopes (same topics, same
bytes) published straight to the broker by one client with the bridge's account, as the bridge publishes
(QoS 1, retained, all in flight, the bridge's cap of 100 unacknowledged), to the last PUBACK; the same
subscriber's last delivery too. The ratio is policycast's time to the last PUBACK over the baseline's.

The change is also run once in-process under cProfile (the route's own service calls, same transaction,
same commit hook), and the top functions by cumulative time are kept, to show where the time goes.

Target (issue [4/4]): <= 2 s from the change to the last publication.

    python -m bench --only resolution_scale
    python -m bench.resolution_scale --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import re
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlmodel import Session

from api.resolution import load_tree
from api.services import policies
from api.services.change import Change
from api.services.groups import COMMUNICATION_FIELDS, copy_location
from bench.checkout import ROOT
from bench.console import say
from bench.observer import Observer
from bench.results import machine, median_of, ratio, result_json, write_result
from bench.stack import Stack
from broker_bridge.broker import BrokerLink, Publication
from fabric_core.topics import config_topic
from manager_db.models import Assignment, Group, Location

NAME = "resolution_scale"
GROUPS = 1000
BRANCHING = 10
ROUNDS = 3
TARGET_S = 2.0
POLICY_NAME = "bench-scale-firewall"
EXTRA_LOCATIONS = (
    ("Office", [{"type": "ip_range", "cidr": "10.20.0.0/16", "weight": 10}]),
    ("Remote", [{"type": "network_type", "value": "vpn", "weight": 5}]),
)
SETTLE_S = 1.0
WAIT_S = 120.0
PROFILE_TOP = 25


# --- the benchmark -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    groups = int(getattr(args, "groups", None) or GROUPS)
    branching = int(getattr(args, "branching", None) or BRANCHING)
    rounds = int(getattr(args, "rounds", None) or ROUNDS)
    profile = not getattr(args, "no_profile", False)
    server_url: str | None = getattr(args, "database_url", None)
    host = machine()
    with (
        tempfile.TemporaryDirectory(prefix="policycast-bench-scale-") as scratch,
        throwaway_database(server_url) as database_url,
        ScaleStack(Path(scratch), database_url) as stack,
    ):
        setup = build_tree(stack, groups=groups, branching=branching)
        with Observer(stack) as observer:
            initial = observer.wait(stack.current_serials_by_topic(), since=0.0, timeout=WAIT_S)
            if initial["arrived"] != setup["documents"]:
                raise RuntimeError(f"the subscriber did not get every retained document: {initial}")
            link = stack.publisher()
            measured: list[dict[str, Any]] = []
            try:
                for number in range(1, rounds + 1):
                    time.sleep(SETTLE_S)
                    baseline = measure_baseline(stack, link, observer)
                    time.sleep(SETTLE_S)
                    change = measure_change(stack, observer, setup["policy_id"], number)
                    measured.append({"round": number, "baseline": baseline, "policycast": change})
                    say(
                        f"round {number}: to outbox {change['time_to_outbox_s']}s, last PUBACK "
                        f"{change['time_to_last_puback_s']}s, last delivery "
                        f"{change['time_to_last_delivery_s']}s; baseline last PUBACK "
                        f"{baseline['time_to_last_puback_s']}s"
                    )
            finally:
                link.close()
            where = profile_change(stack, observer, setup["policy_id"], rounds + 1) if profile else None
        backend = make_url(stack.settings.resolved_database_url).get_backend_name()
    return _result(args, setup, measured, where, backend, groups, host)


def throwaway_database(server_url: str | None) -> contextlib.AbstractContextManager[str | None]:
    """SQLite in the stack's data directory (None), the URL as given (SQLite), or for a PostgreSQL URL
    a database of its own on that server, made for this run and dropped after it."""
    if server_url is None or make_url(server_url).get_backend_name() != "postgresql":
        return contextlib.nullcontext(server_url)
    return _postgres_database(server_url)


@contextlib.contextmanager
def _postgres_database(server_url: str) -> Iterator[str]:
    import psycopg

    url = make_url(server_url)
    admin_dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"policycast_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class ScaleStack(Stack):
    """`bench.stack.Stack` on a database of the caller's choice, with the queries this benchmark needs."""

    def __init__(self, data_dir: Path, database_url: str | None = None) -> None:
        super().__init__(data_dir)
        if database_url:
            self.settings = self.settings.model_copy(update={"database_url": database_url})

    def __enter__(self) -> ScaleStack:
        super().__enter__()
        return self

    @property
    def engine(self) -> Any:
        assert self.manager is not None
        return self.manager.fabric.engine

    def query(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as connection:
            return list(connection.execute(text(sql), params).all())

    def current_documents_by_topic(self) -> dict[str, bytes]:
        """The current envelope of every (group, location), by topic, in serial order."""
        prefix = self.settings.mqtt_prefix
        rows = self.query("SELECT group_id, location_id, envelope FROM effective_configs ORDER BY serial")
        return {config_topic(prefix, g, loc): bytes(envelope) for g, loc, envelope in rows}

    def current_serials_by_topic(self) -> dict[str, int]:
        prefix = self.settings.mqtt_prefix
        rows = self.query("SELECT group_id, location_id, serial FROM effective_configs")
        return {config_topic(prefix, g, loc): int(serial) for g, loc, serial in rows}

    def last_outbox_id(self) -> int:
        return int(self.query("SELECT coalesce(max(id), 0) FROM outbox")[0][0])

    def outbox_since(self, after_id: int) -> list[tuple[int, int, int, datetime | None]]:
        """(group_id, location_id, serial, published_at) of the outbox rows after `after_id`."""
        rows = self.query(
            "SELECT group_id, location_id, serial, published_at FROM outbox WHERE id > :after ORDER BY id",
            after=after_id,
        )
        return [(int(g), int(loc), int(s), _aware(p)) for g, loc, s, p in rows]

    def wait_outbox_published(self, after_id: int, *, timeout: float = WAIT_S) -> list[Any]:
        """Poll until every outbox row after `after_id` is marked published; return the rows."""
        deadline = time.monotonic() + timeout
        while True:
            pending = self.query(
                "SELECT count(*) FROM outbox WHERE id > :after AND published_at IS NULL", after=after_id
            )[0][0]
            if not pending:
                return self.outbox_since(after_id)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pending} outbox row(s) still unpublished after {timeout:.0f}s")
            time.sleep(0.05)


def _aware(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite through a raw text() query
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def firewall_body(edit: int) -> dict[str, Any]:
    """The policy's body at each edit: the same size every time, a different rule set."""
    return {
        "default": "deny",
        "edit": edit,
        "allow": [{"port": 443 + (edit + i) % 7, "proto": "tcp", "to": f"10.{i}.0.0/16"} for i in range(8)],
    }


# --- the tree ----------------------------------------------------------------------------------------


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


# --- one round ---------------------------------------------------------------------------------------


def measure_baseline(stack: ScaleStack, link: BrokerLink, observer: Observer) -> dict[str, Any]:
    """The current documents straight to the broker, as the bridge publishes them."""
    documents = stack.current_documents_by_topic()
    serials = stack.current_serials_by_topic()
    messages = [Publication(topic, body, qos=1, retain=True) for topic, body in documents.items()]
    started = time.time()
    link.publish_many(messages, timeout=WAIT_S)
    acked = time.time()
    seen = observer.wait(serials, since=started, timeout=WAIT_S)
    return {
        "messages": len(messages),
        "bytes": sum(len(body) for body in documents.values()),
        "time_to_last_puback_s": round(acked - started, 4),
        "time_to_last_delivery_s": _since(seen["last_at"], started),
        "delivered": seen["arrived"],
        "subscriber": seen,
    }


def measure_change(stack: ScaleStack, observer: Observer, policy_id: int, edit: int) -> dict[str, Any]:
    """One edit of the root's policy through the admin API, to the bridge's last PUBACK and beyond."""
    before_serials = stack.current_serials_by_topic()
    after_id = stack.last_outbox_id()
    started = time.time()
    answer = stack.call("PUT", f"/policies/{policy_id}", json={"body": firewall_body(edit)})
    answered = time.time()
    rows = stack.wait_outbox_published(after_id)
    return _change_result(stack, observer, rows, before_serials, started, answered, int(answer["version"]))


def _change_result(
    stack: ScaleStack,
    observer: Observer,
    rows: list[tuple[int, int, int, datetime | None]],
    before_serials: dict[str, int],
    started: float,
    answered: float,
    version: int,
) -> dict[str, Any]:
    prefix = stack.settings.mqtt_prefix
    new = {config_topic(prefix, g, loc): serial for g, loc, serial, _ in rows}
    seen = observer.wait(new, since=started, timeout=WAIT_S, version=version)
    marks = sorted({p.timestamp() for _, _, _, p in rows if p is not None})
    current = stack.current_serials_by_topic()
    pairs = [(g, loc) for g, loc, _, _ in rows]
    return {
        "policy_version": version,
        "time_to_outbox_s": round(answered - started, 4),
        "time_to_first_puback_s": _since(marks[0] if marks else None, started),
        "time_to_last_puback_s": _since(marks[-1] if marks else None, started),
        "time_to_last_delivery_s": _since(seen["last_at"], started),
        "outbox_rows": len(rows),
        "outbox_pairs": len(set(pairs)),
        "outbox_published": sum(1 for *_, p in rows if p is not None),
        "bridge_batches": len(marks),
        "bridge_marks_s": [_since(mark, started) for mark in marks],
        "documents": len(before_serials),
        "new_serial_everywhere": all(
            current[t] == new.get(t) and current[t] > s for t, s in before_serials.items()
        )
        and len(new) == len(rows) == len(before_serials),
        "delivered": seen["arrived"],
        "subscriber": seen,
    }


def _since(at: float | None, started: float) -> float | None:
    return None if at is None else round(at - started, 4)


# --- where the time goes -----------------------------------------------------------------------------

PHASES = {
    "update_policy (the service call)": ("api/services/policies.py", "update_policy"),
    "refresh_documents": ("api/resolution.py", "refresh_documents"),
    "load_tree": ("api/resolution.py", "load_tree"),
    "resolve_group (bodies)": ("api/resolution.py", "resolve_group"),
    "document hash (canonical JSON + SHA-256)": ("api/resolution.py", "sha256"),
    "_issue (serials, signing, rows)": ("api/resolution.py", "_issue"),
    "allocate_serials": ("manager_db/counters.py", "allocate_serials"),
    "sign_envelope": ("fabric_core/signing.py", "sign_envelope"),
    "Session.merge": ("sqlalchemy/orm/session.py", "merge"),
    "Session.flush": ("sqlalchemy/orm/session.py", "flush"),
    "SQL statements, all (Connection._execute_context)": ("sqlalchemy/engine/base.py", "_execute_context"),
    "Session.commit": ("sqlalchemy/orm/session.py", "commit"),
    "heartbeat view refresh (after commit)": ("api/heartbeat/view.py", "refresh"),
}


def profile_change(stack: ScaleStack, observer: Observer, policy_id: int, edit: int) -> dict[str, Any]:
    """The same edit in-process under cProfile: the route's service call, commit and commit hook."""
    assert stack.manager is not None
    fabric = stack.manager.fabric
    before_serials = stack.current_serials_by_topic()
    after_id = stack.last_outbox_id()
    profiler = cProfile.Profile()
    started = time.time()
    with Session(fabric.engine, expire_on_commit=False) as session:
        profiler.enable()
        change = Change(
            session=session, actor="bench", signing_key=fabric.signing_key, after_commit=fabric.view.refresh
        )
        policy = policies.update_policy(change, policy_id=policy_id, body=firewall_body(edit))
        change.commit()
        profiler.disable()
    answered = time.time()
    rows = stack.wait_outbox_published(after_id)
    checked = _change_result(stack, observer, rows, before_serials, started, answered, policy.version)
    stats = pstats.Stats(profiler)
    total = float(stats.total_tt)  # type: ignore[attr-defined]  # the service call, commit and hook
    phases = {}
    for label, (path, function) in PHASES.items():
        for (filename, _, name), (_, calls, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
            if name == function and filename.endswith(path):
                phases[label] = {"calls": calls, "cumulative_s": round(cumulative, 4)}
                break
    listing = io.StringIO()
    pstats.Stats(profiler, stream=listing).sort_stats("cumulative").print_stats(PROFILE_TOP)
    top = [_short(line) for line in listing.getvalue().splitlines() if line.strip()]
    say(
        f"profiled change: {total:.2f}s under cProfile; "
        + ", ".join(f"{k} {v['cumulative_s']}s" for k, v in phases.items())
    )
    return {
        "profiled_total_s": round(total, 4),
        "phases": phases,
        "top_cumulative": top[-PROFILE_TOP - 1 :],
        "change": {k: v for k, v in checked.items() if k != "subscriber"},
        "note": (
            "cProfile slows Python code several times over: compare the phases with each other, not with "
            "the rounds' times. The same service call, transaction, commit and commit hook as the route, "
            "in this thread instead of uvicorn's thread pool."
        ),
    }


def _short(line: str) -> str:
    """A profile line with the checkout's and site-packages' directories left out."""
    return re.sub(r"\S*/site-packages/", "", line.replace(f"{ROOT}/", ""))


# --- the result --------------------------------------------------------------------------------------


def _result(
    args: argparse.Namespace,
    setup: dict[str, Any],
    rounds: list[dict[str, Any]],
    where: dict[str, Any] | None,
    backend: str,
    groups: int,
    host: dict[str, Any],
) -> dict[str, Any]:
    documents = setup["documents"]
    last = median_of(rounds, "policycast", "time_to_last_puback_s")
    base = median_of(rounds, "baseline", "time_to_last_puback_s")
    correct = all(
        r["policycast"]["outbox_rows"] == r["policycast"]["outbox_pairs"] == documents
        and r["policycast"]["outbox_published"] == documents
        and r["policycast"]["new_serial_everywhere"]
        and all(r["policycast"]["subscriber"][k] == documents for k in _CHECKS)
        and r["baseline"]["delivered"] == documents
        for r in rounds
    )
    command = f"python -m bench --only {NAME}"
    if getattr(args, "database_url", None):
        command = f"python -m bench.{NAME} --database-url {args.database_url}"
    return {
        "name": NAME,
        "database": backend,
        "tree": {
            "groups": groups,
            "shape": f"root + {groups - 1} groups, branching factor {setup['branching']}, "
            f"levels {setup['levels']}, inheritance off in every group (each owns its locations and "
            "the copy of the root's firewall assignment)",
            "locations_per_group": setup["locations_per_group"],
            "documents": documents,
        },
        "rounds": rounds,
        "median": {
            "policycast": {
                k: median_of(rounds, "policycast", k)
                for k in (
                    "time_to_outbox_s",
                    "time_to_first_puback_s",
                    "time_to_last_puback_s",
                    "time_to_last_delivery_s",
                )
            },
            "baseline": {
                k: median_of(rounds, "baseline", k)
                for k in ("time_to_last_puback_s", "time_to_last_delivery_s")
            },
            "ratio_last_puback": ratio(last, base),
            "ratio_last_delivery": ratio(
                median_of(rounds, "policycast", "time_to_last_delivery_s"),
                median_of(rounds, "baseline", "time_to_last_delivery_s"),
            ),
        },
        "all_correct": correct,
        "targets": {"time_to_last_publish_s": TARGET_S},
        "met": {"time_to_last_publish": last is not None and last <= TARGET_S, "correct": correct},
        "where_the_time_goes": where,
        "setup": setup,
        "command": command,
        "machine": {**host, "load_avg_at_end": os.getloadavg()},
        "notes": (
            "Wall clock in this process (time.time()) for the request and the outbox marks; the subscriber "
            "runs in a process of its own on the same clock. The manager and the bridge run on threads of "
            "this process, Mosquitto and the subscriber in processes of their own, all on this machine. "
            "Time to last PUBACK is the latest published_at of the change's outbox rows: the bridge marks a "
            "batch once the broker acknowledged all of it. The baseline republishes the current envelopes "
            "(same topics, same bytes) with the bridge's account and client (BrokerLink.publish_many)."
        ),
    }


_CHECKS = ("arrived", "exact_serial", "valid_signature", "right_topic", "right_version")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--groups", type=int, help=f"groups in the tree, the root included (default {GROUPS})"
    )
    parser.add_argument("--branching", type=int, help=f"children per group (default {BRANCHING})")
    parser.add_argument("--rounds", type=int, help=f"edits measured (default {ROUNDS})")
    parser.add_argument(
        "--database-url",
        help="default: SQLite in a temporary directory; a postgresql:// URL: a throw-away database made "
        "on that server for the run and dropped after it",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled change")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--no-write", action="store_true", help="print the result instead of writing it")
    args = parser.parse_args(argv)
    result = run(args)
    if args.no_write:
        print(result_json(result))
        return
    path = write_result(NAME, result)
    print(json.dumps(result["median"], indent=2))
    print(f"results in {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
