"""Benchmark 1, push fan-out: one operator change reaching every push agent.

A fleet of push agents (2,000 by default, 10,000 with `--full`) over 10 groups x 2 locations, each with
its MQTT session up. An operator edits the firewall policy assigned at the root (`PUT /policies/{id}`):
each of the 20 (group, location) documents gets a new serial, the bridge publishes them, the broker fans
them out, and each agent verifies and applies its document. Measured per agent: from the admin API's
response (wall clock in this process) to the moment the agent applied the new serial (wall clock in the
simulator's process, taken in an `AgentCore` listener).

Baseline, in the same run, against the same subscribers and broker: the current documents (the same
size, plus one trailing space so that they are not the very bytes each agent holds, which it would
dismiss at a glance) published straight to the broker on the same 20 topics, as the bridge publishes
(QoS 1, all in flight), measured from just before the first publish to the moment each agent handled
the message (verified it and found it was the serial it holds: the same signature and parsing work as
an apply).
The ratio says what the manager and the bridge add to a bare broker fan-out.

Targets (issue [4/4]): p99 <= 1 s and <= 2x the baseline's p99, every agent converged.

On NATS (`--engine nats --broker-nodes 3`, issue [3/6]): the same, on a cluster whose nodes the agents
pick at random (the simulator hands every agent every node's URL); everything speaks MQTT 3.1.1 and the
config goes out at QoS 0 (the engine's delivery), the baseline's too; the observer and the baseline's
publisher connect with the bridge's JWT.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.console import say
from bench.fleet import fleet_size, size_note, stack_and_fleet
from bench.meters import CpuMeter
from bench.observer import Observer
from bench.results import machine, median, median_of, ratio
from bench.stack import Stack, broker_command, publish_documents, serial_of, wait_until
from fabric_core.topics import config_topic

NAME = "push_fanout"
ROUNDS = 3
TARGET_P99_S = 1.0
TARGET_RATIO = 2.0
SETTLE_S = 3.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    agents = fleet_size(args)
    rounds = int(getattr(args, "rounds", None) or ROUNDS)
    with stack_and_fleet(args, agents) as (stack, fleet):
        policy = stack.ensure_root_policy()
        steady = fleet.control.request("wait_converged", timeout_s=120)
        if not steady["ok"]:
            raise RuntimeError(f"the fleet did not converge before the change: {steady}")
        fleet.setup["quiet_wait_s"] = round(fleet.wait_quiet(), 1)
        keys = fleet.keys()
        prefix = stack.settings.mqtt_prefix
        link = stack.publisher()
        measured: list[dict[str, Any]] = []
        observer = Observer(stack).__enter__()
        try:
            for number in range(1, rounds + 1):
                time.sleep(SETTLE_S)
                documents = stack.current_documents(keys)
                # One trailing space (JSON whitespace: the same document, the same signature): an agent
                # takes the very bytes it holds as stale at a glance, and these must cost what a new
                # document costs, a parse and a signature check.
                messages = [
                    (config_topic(prefix, *key.split("/")), body + b" ")
                    for key, body in sorted(documents.items())
                ]
                fleet.wait_quiet()
                meter = CpuMeter(stack, fleet.control)
                started = publish_documents(link, messages, qos=stack.qos)
                baseline = fleet.control.request("wait_messages", since=started, timeout_s=120)
                baseline["cpu_s"] = meter.read()
                held = {topic: serial_of(body) for topic, body in messages}
                baseline["observer"] = _observed(observer.wait(held, since=started, timeout=60), started)
                time.sleep(SETTLE_S)
                fleet.wait_quiet()
                before = stack.current_serials(keys)
                # Waited for: a serial newer than the one held before, per (group, location): known
                # without asking the manager during the fan-out. Checked to be the current one after.
                newer = {key: serial + 1 for key, serial in before.items()}
                meter = CpuMeter(stack, fleet.control)
                sent = time.time()
                answered, version = stack.change_policy(policy["id"])
                change = fleet.control.request("wait_converged", serials=newer, since=answered, timeout_s=120)
                change["cpu_s"] = meter.read()
                after = stack.current_documents(keys)
                expected = {
                    config_topic(prefix, *key.split("/")): serial_of(body) for key, body in after.items()
                }
                change["observer"] = _observed(observer.wait(expected, since=sent, timeout=60), answered)
                current = fleet.control.request("wait_converged", serials=_serials(after), timeout_s=30)
                change["converged"] = min(change["converged"], current["converged"])
                sizes = [len(body) for body in after.values()]
                measured.append(_round(number, baseline, change, documents, sizes, version))
                say(
                    f"round {number}: policycast p99 {change['latency_s'].get('p99')}s "
                    f"({change['converged']}/{change['agents']} converged), baseline p99 "
                    f"{baseline['latency_s'].get('p99')}s ({baseline['received']}/{baseline['agents']})"
                )
        finally:
            observer.__exit__(None, None, None)
            link.close()
        view = _manager_view(stack, agents)
        per_node = stack.node_connections()  # NATS: how the agents spread over the nodes
        final = fleet.control.request("summary")
    result = _result(args, agents, fleet.setup, measured, view, final)
    return {**result, **_broker(args, stack, per_node), "transport": stack.transport}


def _broker(args: argparse.Namespace, stack: Stack, per_node: list[int | None]) -> dict[str, Any]:
    """The engine the fan-out ran on, and how the fleet spread over its nodes."""
    return {
        "command": f"python -m bench --only {NAME} --agents {fleet_size(args)}{broker_command(args)}",
        **stack.broker_description,
        "connections_per_node": per_node,
    }


def _serials(documents: dict[str, bytes]) -> dict[str, int]:
    return {key: serial_of(body) for key, body in documents.items()}


def _observed(seen: dict[str, Any], since: float) -> dict[str, Any]:
    """What one more subscriber, on every config topic in a process of its own, saw: when the broker
    had delivered it the last of the documents. The manager, bridge and broker's share of the fan-out,
    without the fleet simulator's event loop (which handles 10,000 agents' messages one by one)."""
    last = seen.get("last_at")
    return {
        "expected": seen["expected"],
        "arrived": seen["arrived"],
        "valid_signature": seen["valid_signature"],
        "exact_serial": seen["exact_serial"],
        "last_s": None if last is None else round(last - since, 4),
        "first_s": None if seen.get("first_at") is None else round(seen["first_at"] - since, 4),
    }


def _round(
    number: int,
    baseline: dict[str, Any],
    change: dict[str, Any],
    documents: dict[str, bytes],
    sizes: list[int],
    version: int,
) -> dict[str, Any]:
    base, real = baseline["latency_s"], change["latency_s"]
    return {
        "round": number,
        "policy_version": version,
        "baseline": {
            "agents": baseline["agents"],
            "received": baseline["received"],
            "payload_bytes": sorted({len(body) for body in documents.values()}),
            **{k: base.get(k) for k in ("p50", "p99", "max")},
            "cpu_s": baseline.get("cpu_s"),
            "observer": baseline.get("observer"),
        },
        "policycast": {
            "agents": change["agents"],
            "converged": change["converged"],
            "payload_bytes": sorted(set(sizes)),
            **{k: real.get(k) for k in ("p50", "p99", "max")},
            "cpu_s": change.get("cpu_s"),
            "observer": change.get("observer"),
            "by_key_s": change.get("latency_by_key_s"),
        },
        "ratio_p50": ratio(real.get("p50"), base.get("p50")),
        "ratio_p99": ratio(real.get("p99"), base.get("p99")),
    }


def _manager_view(stack: Stack, agents: int) -> dict[str, Any]:
    """What the operator sees: every agent up to date and on push (from their MQTT state reports)."""

    def settled() -> list[dict[str, Any]] | None:
        view = stack.agents_view()
        good = [a for a in view if a["up_to_date"] and a["mode"] == "push" and a["online"]]
        return view if len(good) >= agents else None

    try:
        view = wait_until(settled, timeout=60, what="the manager to see every agent up to date", interval=1)
    except TimeoutError:
        view = stack.agents_view()
    return {
        "agents_listed": len(view),
        "up_to_date": sum(1 for a in view if a["up_to_date"]),
        "push": sum(1 for a in view if a["mode"] == "push"),
        "online": sum(1 for a in view if a["online"]),
    }


def _result(
    args: argparse.Namespace,
    agents: int,
    setup: dict[str, Any],
    rounds: list[dict[str, Any]],
    view: dict[str, Any],
    final: dict[str, Any],
) -> dict[str, Any]:
    p99 = median_of(rounds, "policycast", "p99")
    base_p99 = median_of(rounds, "baseline", "p99")
    all_converged = all(r["policycast"]["converged"] == r["policycast"]["agents"] == agents for r in rounds)
    all_received = all(r["baseline"]["received"] == r["baseline"]["agents"] == agents for r in rounds)
    result: dict[str, Any] = {
        "name": NAME,
        "agents": agents,
        "groups_x_locations": "10 x 2",
        "rounds": rounds,
        "median": {
            "policycast": {k: median_of(rounds, "policycast", k) for k in ("p50", "p99", "max")},
            "baseline": {k: median_of(rounds, "baseline", k) for k in ("p50", "p99", "max")},
            "ratio_p99": ratio(p99, base_p99),
            "observer_last_s": {
                side: median(r[side]["observer"]["last_s"] for r in rounds)
                for side in ("policycast", "baseline")
            },
        },
        "all_converged": all_converged,
        "all_observed": all(
            seen["arrived"] == seen["valid_signature"] == seen["expected"]
            for seen in (r[side]["observer"] for r in rounds for side in ("policycast", "baseline"))
        ),
        "all_received_baseline": all_received,
        "manager_view": view,
        "targets": {"p99_s": TARGET_P99_S, "ratio_p99": TARGET_RATIO},
        "met": {
            "p99": p99 is not None and p99 <= TARGET_P99_S,
            "ratio": (ratio(p99, base_p99) or 99) <= TARGET_RATIO,
            "converged": all_converged,
        },
        "setup": setup,
        "simulator": {
            "loop": final["plan"]["loop"],
            "rss_per_agent_bytes": final["rss_bytes"]["per_agent"],
            "heartbeats": final["heartbeats"],
            "mqtt": final["mqtt"],
        },
        "command": f"python -m bench --only {NAME} --agents {agents}",
        "machine": machine(),
        "notes": (
            "Times are wall clock: the change from the admin API's response in the benchmark process, the "
            "baseline from just before its first publish; each to the agent's apply (policycast) or message "
            "handled (baseline) in the simulator process. The manager and the bridge run on threads of the "
            "benchmark process, the broker (Mosquitto, or each NATS node) and the simulator in processes of "
            "their own, all on this machine."
        ),
    }
    result["notes"] += size_note(args, agents)
    return result
