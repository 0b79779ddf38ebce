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
import cProfile
import io
import json
import os
import pstats
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlmodel import Session

from api.services import policies
from api.services.change import Change
from bench.checkout import ROOT
from bench.console import say
from bench.group_tree import build_tree, firewall_body
from bench.observer import Observer
from bench.results import machine, median_of, ratio, result_json, write_result
from bench.scale_stack import WAIT_S, ScaleStack, throwaway_database
from bench.stack import stack_tls
from broker_bridge.broker import BrokerLink, Publication
from fabric_core.topics import config_topic

NAME = "resolution_scale"
GROUPS = 1000
BRANCHING = 10
ROUNDS = 3
TARGET_S = 2.0
SETTLE_S = 1.0
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
        ScaleStack(Path(scratch), database_url, tls=stack_tls(args)) as stack,
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
        transport = stack.transport
    return {**_result(args, setup, measured, where, backend, groups, host), "transport": transport}


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
