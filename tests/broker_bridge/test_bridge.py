"""The bridge with the real manager (in-process), a real Mosquitto and real MQTT clients as agents."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from sqlmodel import Session, col, select

from broker_bridge import lease, relay, service
from broker_bridge.engine import engine_for
from broker_bridge.errors import BrokerUnavailable
from broker_bridge.service import Bridge
from fabric_core.signing import VerifyKey, open_envelope
from fabric_core.topics import cmd_topic, config_topic, state_topic
from manager_db.models import Agent, OutboxEntry
from tests.support.broker import MqttClient, Received
from tests.support.stack import Stack, bridge_thread
from tests.support.waiting import wait_for

PREFIX = "policycast"


def verified(stack: Stack, payload: bytes) -> dict[str, Any]:
    key = stack.fabric.signing_key.verify_key
    return open_envelope(payload, VerifyKey.from_base64(key.kid, key.public_base64))


def next_document(client: MqttClient, topic: str, *, timeout: float, after: int = 0) -> dict[str, Any]:
    """The next document on `topic` with a serial above `after` (payload parsed, not verified)."""

    def newer(got: list[Received]) -> bool:
        return bool(got) and got[-1].topic == topic and orjson.loads(got[-1].payload)["doc"]["serial"] > after

    doc: dict[str, Any] = orjson.loads(client.received_until(newer, timeout=timeout)[-1].payload)["doc"]
    return doc


def pending_outbox(stack: Stack) -> int:
    with Session(stack.fabric.engine) as session:
        return len(session.exec(select(OutboxEntry).where(col(OutboxEntry.published_at).is_(None))).all())


def outbox_rows(stack: Stack) -> int:
    """Every outbox row ever written, published or not."""
    with Session(stack.fabric.engine) as session:
        return len(session.exec(select(OutboxEntry)).all())


def test_a_root_change_reaches_push_agents_in_every_group_and_location_within_two_seconds(
    stack: Stack,
) -> None:
    admin = stack.admin
    root = admin.root()
    shared = admin.policy("fw", "firewall", {"default": "deny"})
    admin.put(f"/groups/{root['id']}/policies/firewall", {"policy_id": shared["id"]})
    sales = admin.group("Sales", root["id"])  # inherits
    emea = admin.group("EMEA", sales["id"])  # inherits through Sales
    servers = admin.group("Servers", root["id"], inherit=False)  # owns a copy: same shared policy
    office = admin.post(f"/groups/{servers['id']}/locations", {"name": "Office", "conditions": []})
    targets = [
        (root["id"], admin.default_location(root["id"])["id"]),
        (sales["id"], admin.default_location(root["id"])["id"]),
        (emea["id"], admin.default_location(root["id"])["id"]),
        (servers["id"], admin.default_location(servers["id"])["id"]),
        (servers["id"], office["id"]),
    ]
    subscribers = []
    for group_id, location_id in targets:
        _, client = stack.push_agent(group_id)
        topic = config_topic(PREFIX, group_id, location_id)
        assert not client.subscribe(topic).is_failure
        first = next_document(client, topic, timeout=5)  # the retained current document
        subscribers.append((client, topic, first["serial"], group_id, location_id))

    admin.put(f"/policies/{shared['id']}", {"body": {"default": "allow"}})
    answered = time.monotonic()

    for client, topic, serial, group_id, location_id in subscribers:
        remaining = 2.0 - (time.monotonic() - answered)
        message = client.expect(topic, timeout=max(remaining, 0.01))
        doc = verified(stack, message.payload)
        assert doc["serial"] > serial
        assert (doc["group_id"], doc["location_id"]) == (group_id, location_id)
        assert doc["policies"]["firewall"]["body"] == {"default": "allow"}
        assert doc["policies"]["firewall"]["version"] == 2


def test_an_agent_that_connects_late_gets_the_current_document_retained(stack: Stack) -> None:
    admin = stack.admin
    root = admin.root()
    policy = admin.policy("av", "antivirus", {"scan": "hourly"})
    admin.put(f"/groups/{root['id']}/policies/antivirus", {"policy_id": policy["id"]})
    current = admin.effective(root["id"])
    wait_for(lambda: pending_outbox(stack) == 0, timeout=5, what="the bridge to drain the outbox")

    _, client = stack.push_agent(root["id"])
    topic = config_topic(PREFIX, root["id"], current["location_id"])
    assert not client.subscribe(topic).is_failure
    message = client.expect(topic, timeout=5)

    assert message.retain
    assert verified(stack, message.payload) == current


def test_a_bridge_killed_between_publish_and_mark_loses_nothing(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = stack.admin
    root = admin.root()
    agent, client = stack.push_agent(root["id"])
    topic = config_topic(PREFIX, root["id"], admin.default_location(root["id"])["id"])
    assert not client.subscribe(topic).is_failure
    held = orjson.loads(client.expect(topic, timeout=5).payload)["doc"]["serial"]
    stack.bridge.stop()  # from here on, bridges run by hand

    policy = admin.policy("fw", "firewall", {"v": 1})
    admin.put(f"/groups/{root['id']}/policies/firewall", {"policy_id": policy["id"]})
    target = admin.effective(root["id"])["serial"]
    fabric = stack.fabric

    class Killed(BaseException):
        pass

    def killed(*_: object) -> None:
        raise Killed  # the process dies after the broker acknowledged, before the row is marked

    doomed_link = stack.broker.link("doomed")
    broker = engine_for(fabric.settings, fabric.signing_key)
    doomed = Bridge(settings=fabric.settings, engine=fabric.engine, broker=broker, link=doomed_link)
    monkeypatch.setattr(relay, "_mark", killed)
    with pytest.raises(Killed):
        doomed.round()
    monkeypatch.undo()
    assert pending_outbox(stack) > 0  # published, not marked
    # Past copies of the held document (a bridge taking the lease republishes what is current)
    assert next_document(client, topic, timeout=5, after=held)["serial"] == target
    doomed_link.close()  # its lease runs out; a restarted bridge takes over

    restarted = Bridge(
        settings=fabric.settings,
        engine=fabric.engine,
        broker=broker,
        link=stack.broker.link("again"),
    )
    lease.release(fabric.engine, holder=doomed.holder)  # as expiry would, without waiting 10 s
    restarted.round()

    assert pending_outbox(stack) == 0
    # The retained document is the latest: check as an agent connecting now would.
    mqtt = agent.enrolment["mqtt"]
    late = stack.broker.client(mqtt["username"], mqtt["password"], client_id=agent.id)
    assert not late.connect().is_failure
    assert not late.subscribe(topic).is_failure
    assert verified(stack, late.expect(topic, timeout=5).payload)["serial"] == target


def test_a_broker_outage_holds_changes_in_the_outbox_until_it_returns(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = stack.admin
    root = admin.root()
    location = admin.default_location(root["id"])["id"]
    _, client = stack.push_agent(root["id"])
    client.close()
    bridge = stack.bridge.bridge
    wait_for(lambda: pending_outbox(stack) == 0, timeout=5, what="the bridge to drain the outbox")
    published = bridge.published
    # A round gives up a publication after 0.2 s instead of 10 s, so that the outage shows in rounds.
    monkeypatch.setattr(service, "PUBLISH_TIMEOUT_S", 0.2)
    attempts: list[tuple[set[int], BaseException | None]] = []
    real_publish_many = bridge.link.publish_many

    def recorded(messages: Any, *, timeout: float) -> None:
        batch = list(messages)
        documents = [m for m in batch if m.topic.startswith(f"{PREFIX}/v1/config/") and m.payload]
        serials = {orjson.loads(m.payload)["doc"]["serial"] for m in documents}
        try:
            real_publish_many(batch, timeout=timeout)
        except BaseException as exc:
            attempts.append((serials, exc))
            raise
        attempts.append((serials, None))

    monkeypatch.setattr(bridge.link, "publish_many", recorded)
    stack.broker.stop()

    policy = admin.policy("fw", "firewall", {"during": "outage"})
    admin.put(f"/groups/{root['id']}/policies/firewall", {"policy_id": policy["id"]})
    admin.put(f"/policies/{policy['id']}", {"body": {"during": "outage", "edit": 2}})
    target = admin.effective(root["id"])["serial"]

    def failed_to_publish_target() -> bool:
        return any(target in serials and isinstance(error, BrokerUnavailable) for serials, error in attempts)

    wait_for(
        failed_to_publish_target,
        timeout=10,
        what=lambda: f"a bridge round failing to publish serial {target} while the broker is down {attempts}",
    )
    assert pending_outbox(stack) == 2  # the assignment's document and the edit's, neither marked published
    assert bridge.published == published

    stack.broker.start()
    # The round marks the rows, then counts them in `published`: wait for the count, then the rows.
    wait_for(
        lambda: bridge.published,
        until=lambda count: count >= published + 2,
        timeout=15,
        what="the bridge to settle the outbox after the outage",
    )
    assert pending_outbox(stack) == 0
    assert bridge.published == published + 2  # both rows settled (the newer document superseding the older)
    assert any(target in serials and error is None for serials, error in attempts)
    _, again = stack.push_agent(root["id"], hostname="after")
    topic = config_topic(PREFIX, root["id"], location)
    assert not again.subscribe(topic).is_failure
    assert verified(stack, again.expect(topic, timeout=5).payload)["serial"] == target


def test_many_changes_leave_in_serial_order_even_with_two_bridges(stack: Stack) -> None:
    admin = stack.admin
    root = admin.root()

    second = bridge_thread(stack.client, stack.broker)
    try:
        _, client = stack.push_agent(root["id"])
        topic = config_topic(PREFIX, root["id"], admin.default_location(root["id"])["id"])
        assert not client.subscribe(topic).is_failure
        wait_for(lambda: pending_outbox(stack) == 0, timeout=5, what="the bridge to drain the outbox")
        rows_before = outbox_rows(stack)
        policy = admin.policy("fw", "firewall", {"n": 0})
        admin.put(f"/groups/{root['id']}/policies/firewall", {"policy_id": policy["id"]})
        for n in range(1, 21):
            admin.put(f"/policies/{policy['id']}", {"body": {"n": n}})
        target = admin.effective(root["id"])["serial"]
        rows = outbox_rows(stack)
        assert rows == rows_before + 21  # one outbox row per change: the assignment and twenty edits

        def settled() -> int:
            return stack.bridge.bridge.published + second.bridge.published

        # A round marks its rows, then counts them: wait for the count, then look at the rows.
        wait_for(settled, until=lambda n: n >= rows, timeout=10, what="the bridges to settle the outbox")
        assert pending_outbox(stack) == 0
        # Each row settled once, by the lease holder, whichever bridge that is (superseded rows are
        # settled without being sent).
        assert settled() == rows

        # Everything the bridges sent arrives before a marker published after the outbox drained.
        sent = stack.broker.received_before_marker(client, topic)
        received = [orjson.loads(m.payload)["doc"]["serial"] for m in sent]
        assert received == sorted(received)  # never an older document after a newer one
        assert received[-1] == target
    finally:
        second.stop()


def test_agent_state_reaches_the_operator_view_and_the_last_will_marks_it_offline(stack: Stack) -> None:
    admin = stack.admin
    root = admin.root()
    agent, _ = stack.push_agent(root["id"])
    serial = admin.effective(root["id"])["serial"]
    location = admin.default_location(root["id"])["id"]
    topic = state_topic(PREFIX, agent.id)
    password = agent.enrolment["mqtt"]["password"]
    online = {"agent_id": agent.id, "online": True, "serial": serial, "location_id": location, "mode": "push"}
    presence = stack.broker.client(agent.id, password, client_id=agent.id).will(
        topic, orjson.dumps({"agent_id": agent.id, "online": False})
    )
    assert not presence.connect().is_failure
    assert not presence.publish(topic, orjson.dumps(online), retain=True).is_failure

    view = wait_for(
        lambda: admin.agent(agent.id), until=lambda a: a["online"], timeout=5, what="the agent online"
    )
    assert (view["mode"], view["serial"], view["location_id"], view["up_to_date"]) == (
        "push",
        serial,
        location,
        True,
    )

    sock = presence.paho.socket()
    assert sock is not None
    sock.close()  # dies without a DISCONNECT: the broker sends the will
    view = wait_for(
        lambda: admin.agent(agent.id),
        until=lambda a: not a["online"],
        timeout=10,
        what="the last will to mark the agent offline",
    )
    assert view["serial"] == serial  # the will says only "offline"; what the agent held stays


def test_malformed_state_is_logged_and_dropped(stack: Stack) -> None:
    admin = stack.admin
    agent, client = stack.push_agent(admin.root()["id"])
    topic = state_topic(PREFIX, agent.id)
    for payload in (
        b"not json",
        b'{"online": true}',
        orjson.dumps({"agent_id": "someone-else", "online": True}),
    ):
        assert not client.publish(topic, payload).is_failure
    wait_for(lambda: stack.bridge.bridge.ingest.dropped >= 3, timeout=5, what="three dropped state messages")
    assert stack.bridge.bridge.ingest.dropped == 3
    with Session(stack.fabric.engine) as session:
        stored = session.get(Agent, agent.id)
    assert stored is not None and stored.online is None


def test_update_now_reaches_push_agents_on_their_cmd_topic(stack: Stack) -> None:
    admin = stack.admin
    root = admin.root()
    branch = admin.group("Branch", root["id"])
    agents = [stack.push_agent(branch["id"], hostname=f"h{i}") for i in range(2)]
    for agent, client in agents:
        assert not client.subscribe(cmd_topic(PREFIX, agent.id)).is_failure

    admin.post(f"/agents/{agents[0][0].id}/update-now", {}, expect=202)
    command = orjson.loads(agents[0][1].expect(cmd_topic(PREFIX, agents[0][0].id), timeout=5).payload)
    assert command["command"] == "update_now"

    asked = admin.post(f"/groups/{root['id']}/update-now", {}, expect=202)
    assert asked["agents"] == 2
    for agent, client in agents:
        assert (
            orjson.loads(client.expect(cmd_topic(PREFIX, agent.id), timeout=5).payload)["command"]
            == "update_now"
        )


def test_moving_or_revoking_an_agent_changes_what_the_broker_lets_it_read(stack: Stack) -> None:
    admin = stack.admin
    root = admin.root()
    servers = admin.group("Servers", root["id"], inherit=False)
    agent, client = stack.push_agent(root["id"])
    assert not client.subscribe(cmd_topic(PREFIX, agent.id)).is_failure
    held = agent.enrolment["mqtt"]

    admin.patch(f"/agents/{agent.id}", {"group_id": servers["id"]})

    if stack.broker.engine_name == "nats":
        # A JWT names its subjects: the move brings a new one on the agent's cmd topic (and an
        # "update now", in either order).
        def credentials(got: list[Received]) -> bool:
            return bool(got) and orjson.loads(got[-1].payload)["command"] == "credentials"

        command = orjson.loads(client.received_until(credentials, timeout=10)[-1].payload)
        assert command["command"] == "credentials"
        old, held = held, command["mqtt"]
        assert held["password"] != old["password"]
        assert reads(stack, old, root["id"]) is True and reads(stack, old, servers["id"]) is False

    def moved() -> bool:
        return reads(stack, held, servers["id"]) is True and reads(stack, held, root["id"]) is False

    wait_for(moved, timeout=10, what="the move on the broker")

    admin.delete(f"/agents/{agent.id}")

    def refused() -> bool:
        probe = stack.broker.client(held["username"], held["password"])
        failed = probe.connect().is_failure
        probe.close()
        return failed

    wait_for(refused, timeout=10, what="the revoked agent's broker access to go")


def reads(stack: Stack, mqtt: dict[str, Any], group_id: int) -> bool | None:
    """Whether the broker grants these credentials a subscription to the group's config; None: no
    answer (ask again)."""
    client = stack.broker.client(mqtt["username"], mqtt["password"])
    if client.connect().is_failure:
        client.close()
        return None
    try:
        granted: bool | None = not client.subscribe(config_topic(PREFIX, group_id, 1)).is_failure
    except AssertionError:
        # Mosquitto disconnects an account's clients when its roles change: the bridge's move
        # can land between this probe's CONNECT and SUBSCRIBE.
        granted = None
    client.close()
    return granted


def test_deleting_a_location_clears_its_retained_document(stack: Stack) -> None:
    admin = stack.admin
    root = admin.root()
    lab = admin.post(f"/groups/{root['id']}/locations", {"name": "Lab", "conditions": []})
    agent, client = stack.push_agent(root["id"])
    topic = config_topic(PREFIX, root["id"], lab["id"])
    assert not client.subscribe(topic).is_failure
    assert client.expect(topic, timeout=5).payload  # the retained document of Lab

    admin.delete(f"/groups/{root['id']}/locations/{lab['id']}")

    # Withdrawn: an empty payload (after, perhaps, the bridge's start-up republication of the old one).
    client.received_until(lambda got: bool(got) and got[-1].topic == topic and got[-1].payload == b"")
    mqtt = agent.enrolment["mqtt"]
    late = stack.broker.client(mqtt["username"], mqtt["password"], client_id=agent.id)
    assert not late.connect().is_failure
    assert not late.subscribe(topic).is_failure
    assert stack.broker.received_before_marker(late, topic) == []  # nothing retained any more


def test_deleting_a_group_clears_its_retained_documents(stack: Stack) -> None:
    admin = stack.admin
    root = admin.root()
    doomed = admin.group("Doomed", root["id"])
    topic = config_topic(PREFIX, doomed["id"], admin.default_location(root["id"])["id"])
    password = stack.broker.provision("reader", doomed["id"])  # an account that may read that group

    def retained() -> list[bytes]:
        reader = stack.broker.client("reader", password)
        assert not reader.connect().is_failure
        assert not reader.subscribe(topic).is_failure
        payloads = [m.payload for m in stack.broker.received_before_marker(reader, topic) if m.retain]
        reader.close()
        return payloads

    wait_for(retained, timeout=10, what="the group's retained document")

    admin.delete(f"/groups/{doomed['id']}")

    wait_for(lambda: pending_outbox(stack) == 0, timeout=10, what="the clearing to be published")
    assert retained() == []


def test_a_revoked_agent_is_disconnected_within_five_seconds(stack: Stack) -> None:
    admin = stack.admin
    root = admin.root()
    agent, client = stack.push_agent(root["id"])
    assert not client.subscribe(cmd_topic(PREFIX, agent.id)).is_failure

    revoked_at = time.monotonic()
    admin.delete(f"/agents/{agent.id}")
    # Mosquitto: the bridge deletes its dynsec client; NATS: the bridge pushes the account's
    # revocation list to the cluster, and every node drops the agent's connections.
    client.wait_disconnected(timeout=5)
    took = time.monotonic() - revoked_at
    assert took <= 5.0, f"disconnected {took:.1f}s after the revocation"
    again = stack.broker.client(agent.enrolment["mqtt"]["username"], agent.enrolment["mqtt"]["password"])
    assert again.connect().is_failure, "a revoked agent's credentials connect again"
