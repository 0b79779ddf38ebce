"""Anti-entropy: a push agent that a lost message left behind is repaired within seconds.

The agents here are real MQTT clients on a real Mosquitto, and "lost" is what the manager sees: an
online agent whose state report says it holds an older serial than its document's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import orjson
import pytest
from sqlmodel import Session

from broker_bridge.anti_entropy import AntiEntropy
from broker_bridge.broker import Publication
from fabric_core.settings import Settings
from fabric_core.topics import cmd_topic, config_topic, state_topic
from manager_db.models import Agent
from tests.support.broker import MqttClient
from tests.support.stack import Stack
from tests.support.waiting import wait_for

PREFIX = "policycast"
GRACE_S = 0.6


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"anti_entropy_s": 0.1, "anti_entropy_grace_s": GRACE_S, "command_resend_s": 0.5}
    )


def report(client: MqttClient, agent_id: str, serial: int, group_id: int) -> None:
    payload = {"agent_id": agent_id, "online": True, "serial": serial, "group_id": group_id, "mode": "push"}
    reason = client.publish(state_topic(PREFIX, agent_id), orjson.dumps(payload), retain=True)
    assert not reason.is_failure, reason


def rounds_later(stack: Stack, count: int) -> Callable[[], bool]:
    """A condition true once the bridge has run `count` more repair rounds."""
    start = stack.bridge.bridge.repair.rounds
    return lambda: stack.bridge.bridge.repair.rounds >= start + count


def agent_row(stack: Stack, agent_id: str) -> Agent:
    with Session(stack.fabric.engine) as session:
        row = session.get(Agent, agent_id)
        assert row is not None
        return row


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingPublisher:
    def __init__(self) -> None:
        self.messages: list[Publication] = []

    def publish_many(self, messages: Sequence[Publication], *, timeout: float) -> None:
        self.messages.extend(messages)


def serial_of(payload: bytes) -> int:
    return int(orjson.loads(payload)["doc"]["serial"])


def test_an_agent_behind_its_document_gets_it_republished_then_is_nudged(stack: Stack) -> None:
    admin = stack.admin
    root = admin.root()
    group = admin.group("Branch", root["id"])
    agent, client = stack.push_agent(group["id"])
    location = admin.get(f"/groups/{group['id']}/locations")[0]["id"]
    topic = config_topic(PREFIX, group["id"], location)
    assert not client.subscribe(topic).is_failure
    assert not client.subscribe(cmd_topic(PREFIX, agent.id)).is_failure
    current = serial_of(client.expect(topic).payload)

    # The agent says it holds nothing: as if the document had been lost on its way.
    report(client, agent.id, 0, group["id"])

    again = client.expect(topic, timeout=10)
    assert serial_of(again.payload) == current, "the current document, published again"
    nudge = orjson.loads(client.expect(cmd_topic(PREFIX, agent.id), timeout=10).payload)
    assert nudge["command"] == "update_now"
    assert stack.bridge.bridge.repair.repaired_topics >= 1

    # Caught up: no more repairs for it.
    report(client, agent.id, current, group["id"])
    wait_for(lambda: agent_row(stack, agent.id).serial == current, timeout=10, what="the report to land")
    settled = rounds_later(stack, 1)
    wait_for(settled, timeout=10, what="a repair round after the report")
    quiet = rounds_later(stack, int(3 * GRACE_S / 0.1))
    wait_for(quiet, timeout=20, what="three graces of repair rounds")
    got = stack.broker.received_before_marker(client, cmd_topic(PREFIX, agent.id))
    assert [r for r in got if r.topic == cmd_topic(PREFIX, agent.id)] == []


def test_a_document_inside_its_grace_is_not_repaired_and_nudges_back_off(stack: Stack) -> None:
    admin = stack.admin
    root = admin.root()
    group = admin.group("Branch", root["id"])
    agent, client = stack.push_agent(group["id"])
    report(client, agent.id, 0, group["id"])
    wait_for(lambda: agent_row(stack, agent.id).online, timeout=10, what="the agent online")
    clock = FakeClock()
    sent = RecordingPublisher()
    repair = AntiEntropy(prefix=PREFIX, interval_s=1, grace_s=5, republish_all_s=1000, clock=clock)
    location = admin.get(f"/groups/{group['id']}/locations")[0]["id"]
    repair.note_published([(group["id"], location)])

    clock.now += 4.9
    assert repair.run_round(stack.fabric.engine, sent).republished == []  # inside the grace
    clock.now += 0.2
    assert repair.run_round(stack.fabric.engine, sent).republished == [(group["id"], location)]
    assert repair.run_round(stack.fabric.engine, sent).republished == []  # republished just now
    clock.now += 5
    first = repair.run_round(stack.fabric.engine, sent)
    assert first.nudged == [agent.id]
    clock.now += 5
    assert repair.run_round(stack.fabric.engine, sent).nudged == []  # backing off: 10 s now
    clock.now += 5
    assert repair.run_round(stack.fabric.engine, sent).nudged == [agent.id]
    commands = [orjson.loads(m.payload) for m in sent.messages if m.topic == cmd_topic(PREFIX, agent.id)]
    assert [c["command"] for c in commands] == ["update_now", "update_now"]
    assert commands[0]["id"] != commands[1]["id"]


def test_an_update_now_nobody_acted_on_is_sent_again_under_the_same_id(stack: Stack) -> None:
    admin = stack.admin
    root = admin.root()
    agent, client = stack.push_agent(root["id"])
    assert not client.subscribe(cmd_topic(PREFIX, agent.id)).is_failure
    current = int(admin.effective(root["id"])["serial"])

    # Up to date: anti-entropy leaves it alone. Said again until the bridge has it: a report crossing
    # NATS nodes at QoS 0 can be lost on a loaded machine, and an agent's next report would repair it.
    def online() -> bool:
        if agent_row(stack, agent.id).online:
            return True
        report(client, agent.id, current, root["id"])
        return False

    wait_for(
        online,
        timeout=30,
        interval=1.0,
        what="the agent online",
    )

    admin.post(f"/agents/{agent.id}/update-now", {}, expect=202)
    first = orjson.loads(client.expect(cmd_topic(PREFIX, agent.id), timeout=5).payload)
    second = orjson.loads(client.expect(cmd_topic(PREFIX, agent.id), timeout=10).payload)
    assert second["id"] == first["id"] and second["command"] == "update_now"

    agent.heartbeat(serial=current)  # acted: the manager served the update
    wait_for(
        lambda: not agent_row(stack, agent.id).update_requested, timeout=10, what="the update to be served"
    )
    wait_for(rounds_later(stack, int(3 * 0.5 / 0.1)), timeout=20, what="three resend periods")
    got = stack.broker.received_before_marker(client, cmd_topic(PREFIX, agent.id))
    assert [r for r in got if r.topic == cmd_topic(PREFIX, agent.id)] == []
