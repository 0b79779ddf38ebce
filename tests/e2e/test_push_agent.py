"""End to end in push mode: Mosquitto with the project's configuration, `policycast serve`,
`policycast bridge` and `policycast-agent run`, each a real process (the `push_stack` fixture)."""

from __future__ import annotations

import time

import orjson
import pytest

from fabric_core.signing import SigningKey
from fabric_core.topics import config_topic
from tests.e2e.conftest import PushStack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e
PUSH_WITHIN_S = 2.0  # the bound for a change to reach push agents
SLACK_S = 3.0


def test_a_change_reaches_a_push_agent_at_once_while_its_heartbeat_is_an_hour_away(
    push_stack: PushStack,
) -> None:
    root = push_stack.manager.root()
    push_stack.manager.admin.communication(root, mode="push", heartbeat_s=3600)
    agent = push_stack.agent("push-1", root)
    try:
        push_stack.wait_transport(agent, "push", timeout=15)
        target = push_stack.change(root, {"default": "deny"})
        started = time.monotonic()
        wait_for(
            agent.applied,
            until=lambda d: d is not None and d["serial"] == target,
            timeout=PUSH_WITHIN_S,
            what=lambda: f"serial {target} pushed to the agent\n{agent.output()}",
        )
        assert time.monotonic() - started <= PUSH_WITHIN_S
        view = wait_for(
            lambda: push_stack.view(agent.agent_id),
            until=lambda v: v["up_to_date"],
            timeout=5,
            what="the report",
        )
        assert view["online"] is True and view["mode"] == "push"
    finally:
        assert agent.stop() == 0, agent.output()


def test_the_broker_going_away_falls_back_to_pull_and_coming_back_returns_to_push(
    push_stack: PushStack,
) -> None:
    root = push_stack.manager.root()
    push_stack.manager.admin.communication(root, mode="push", heartbeat_s=2)
    agent = push_stack.agent("push-2", root)
    try:
        push_stack.wait_transport(agent, "push", timeout=15)
        push_stack.broker.stop()

        during = push_stack.change(root, {"during": "outage"})
        wait_for(
            agent.applied,
            until=lambda d: d is not None and d["serial"] == during,
            timeout=2 * 1.1 + SLACK_S,
            what=lambda: f"serial {during} by heartbeat during the outage\n{agent.output()}",
        )
        push_stack.wait_transport(agent, "pull", timeout=5)

        push_stack.broker.start()
        push_stack.wait_transport(agent, "push", timeout=15)
        after = push_stack.change(root, {"after": "outage"})
        wait_for(
            agent.applied,
            until=lambda d: d is not None and d["serial"] == after,
            timeout=PUSH_WITHIN_S + 1,
            what=lambda: f"serial {after} after the broker returned\n{agent.output()}",
        )
    finally:
        assert agent.stop() == 0, agent.output()


def test_operator_update_now_makes_a_push_agent_heartbeat_at_once(push_stack: PushStack) -> None:
    manager = push_stack.manager
    root = manager.root()
    manager.admin.communication(root, mode="push", heartbeat_s=3600)
    agent = push_stack.agent("push-3", root)
    try:
        push_stack.wait_transport(agent, "push", timeout=15)
        assert not manager.agent_row(agent.agent_id)["update_requested"]

        manager.admin.post(f"/agents/{agent.agent_id}/update-now", {}, expect=202)

        # The request is pending in the database until a heartbeat is answered with it: only the
        # heartbeat bookkeeping of such an answer clears it (the bridge's state ingest never does).
        # The next heartbeat is an hour away, so the agent heartbeated because of the command.
        wait_for(
            lambda: not manager.agent_row(agent.agent_id)["update_requested"],
            timeout=SLACK_S + 2,
            what=lambda: f"a heartbeat answered with the update\n{agent.output()}",
        )
        assert "push: command update_now" in agent.output()  # it came on the agent's cmd topic
    finally:
        assert agent.stop() == 0, agent.output()


def test_a_forged_or_unsigned_document_on_the_config_topic_is_not_applied(push_stack: PushStack) -> None:
    root = push_stack.manager.root()
    push_stack.manager.admin.communication(root, mode="push", heartbeat_s=3600)
    agent = push_stack.agent("push-4", root)
    try:
        push_stack.wait_transport(agent, "push", timeout=15)
        held = agent.applied()
        assert held is not None
        location = held["location_id"]
        topic = config_topic("policycast", root, location)
        forged_doc = {
            **held,
            "serial": held["serial"] + 1000,
            "policies": {"firewall": {"body": {"open": "all"}}},
        }
        forged = SigningKey.generate().sign_envelope(forged_doc)  # a key the agent never pinned
        unsigned = orjson.dumps({"doc": forged_doc, "sig": "", "kid": "none"})
        tampered = orjson.loads(forged)
        tampered["kid"] = agent.identity["signing_key"]["kid"]
        admin = push_stack.broker.link("forger")  # the bridge's own credentials: the broker lets it publish
        for payload in (forged, unsigned, orjson.dumps(tampered), b"not json"):
            admin.publish(topic, payload, qos=1, retain=False)
        wait_for(
            lambda: agent.output().count("rejected a document from mqtt") >= 4,
            timeout=5,
            what=lambda: f"the agent rejecting four payloads\n{agent.output()}",
        )
        assert agent.applied() == held
    finally:
        assert agent.stop() == 0, agent.output()


def test_a_moved_push_agent_gets_its_new_groups_document_and_loses_the_old_groups(
    push_stack: PushStack,
) -> None:
    admin = push_stack.manager.admin
    root = push_stack.manager.root()
    admin.communication(root, mode="push", heartbeat_s=3600)
    lab = admin.group("Lab", root, inherit=False)["id"]
    admin.communication(lab, mode="push", heartbeat_s=3600)
    lab_serial = push_stack.change(lab, {"default": "allow", "group": "lab"})
    agent = push_stack.agent("mover", root)
    try:
        push_stack.wait_transport(agent, "push", timeout=15)
        started = time.monotonic()

        admin.patch(f"/agents/{agent.agent_id}", {"group_id": lab})

        doc = wait_for(
            agent.applied,
            until=lambda d: d is not None and d["group_id"] == lab,
            timeout=PUSH_WITHIN_S + SLACK_S,
            what=lambda: f"the Lab document at the moved agent\n{agent.output()}",
        )
        assert doc["serial"] >= lab_serial
        assert time.monotonic() - started <= PUSH_WITHIN_S + SLACK_S  # at once, not at the heartbeat
        # The old group's changes no longer reach it; the new group's do, pushed.
        push_stack.change(root, {"default": "deny", "group": "root"})
        newer = push_stack.change(lab, {"default": "deny", "group": "lab"})
        wait_for(
            agent.applied,
            until=lambda d: d is not None and d["serial"] == newer,
            timeout=PUSH_WITHIN_S + SLACK_S,
            what=lambda: f"Lab's next change at the moved agent\n{agent.output()}",
        )
        assert agent.applied()["group_id"] == lab
    finally:
        assert agent.stop() == 0, agent.output()
