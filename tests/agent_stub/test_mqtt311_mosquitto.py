"""MQTT 3.1.1 (what NATS speaks), broker URL lists and credentials replaced under a running agent, against
real Mosquitto brokers (TLS, dynamic security, the agent on its own account: tests/support/broker.py).

Mosquitto speaks both versions, so the 3.1.1 link is checked here against the same ACLs as the MQTT 5
one: connect, subscribe, retained delivery, refusals on the `LinkError` hierarchy.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from agent_stub.broker_account import NOT_AUTHORISED
from agent_stub.core import AgentCore
from agent_stub.errors import LinkRefused
from agent_stub.mqtt_link import LinkOptions, Message, MqttLink
from agent_stub.runtime import AgentRuntime
from agent_stub.state import FileStateStore, StoredMqttCredentials
from broker_bridge.mosquitto import accounts
from fabric_core.settings import AgentSettings
from fabric_core.signing import SigningKey
from fabric_core.tls import ManagerCA
from fabric_core.topics import DEFAULT_PREFIX, cmd_topic, config_topic, state_topic
from fabric_core.wire import MqttCredentials, MqttDelivery
from tests.agent_stub.conftest import (
    AGENT_ID,
    GROUP_ID,
    LOCATION_ID,
    WAIT_S,
    make_doc,
    make_identity,
    running,
)
from tests.agent_stub.fakes import FakeManager
from tests.support.broker import Broker, require_mosquitto
from tests.support.waiting import wait_for_async

T = TypeVar("T")
CONFIG = config_topic(DEFAULT_PREFIX, GROUP_ID, LOCATION_ID)
OTHER_GROUP = config_topic(DEFAULT_PREFIX, GROUP_ID + 1, LOCATION_ID)
CMD = cmd_topic(DEFAULT_PREFIX, AGENT_ID)
STATE = state_topic(DEFAULT_PREFIX, AGENT_ID)
V311 = MqttDelivery(qos=0, persistent_session=False, protocol="3.1.1")


def _run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def _received(into: list[Message]) -> Callable[[Message], None]:
    return into.append


def _bridge(broker: Broker, into: list[Message] | None = None) -> MqttLink:
    """The bridge's own account (MQTT 5): publishes documents and commands, reads agents' states."""
    options = LinkOptions(
        address=broker.address,
        client_id=f"bridge-{uuid.uuid4().hex[:6]}",
        username=broker.bridge_username,
        password=broker.bridge_password,
        timeout_s=2,
        ssl_context=broker.ssl_context,
    )
    return MqttLink(options, _received(into if into is not None else []))


def _agent_link(broker: Broker, password: str, into: list[Message]) -> MqttLink:
    options = LinkOptions(
        address=broker.address,
        client_id=AGENT_ID,
        username=AGENT_ID,
        password=password,
        clean_start=True,
        protocol="3.1.1",
        timeout_s=2,
        ssl_context=broker.ssl_context,
        will=Message(STATE, b'{"agent_id":"agent-1","online":false}', qos=1, retain=True),
    )
    return MqttLink(options, _received(into))


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


# --- the 3.1.1 link ------------------------------------------------------------------------------------


def test_a_3_1_1_link_connects_subscribes_and_gets_the_retained_document(mosquitto: Broker) -> None:
    password = mosquitto.provision(AGENT_ID, GROUP_ID)
    got: list[Message] = []

    async def scenario() -> None:
        bridge = _bridge(mosquitto)
        await bridge.connect()
        await bridge.publish(Message(CONFIG, b"document-1", qos=1, retain=True))
        agent = _agent_link(mosquitto, password, got)
        assert await agent.connect() is False  # a clean session: nothing kept
        assert await agent.subscribe(CMD, qos=0) == 0
        assert await agent.subscribe(CONFIG, qos=1) == 1
        await wait_for_async(lambda: got, timeout=WAIT_S, what="the retained document")
        assert (got[0].topic, got[0].payload, got[0].retain) == (CONFIG, b"document-1", True)
        await bridge.publish(Message(CMD, b"command-1", qos=1))
        await wait_for_async(lambda: len(got) == 2, timeout=WAIT_S, what="the command")
        assert (got[1].payload, got[1].retain) == (b"command-1", False)
        await agent.publish(Message(STATE, b'{"online":true}', qos=1, retain=True))  # PUBACK: no code
        await agent.unsubscribe(CONFIG)  # UNSUBACK: no code, a success
        await agent.close()
        await bridge.close()

    _run(scenario)


def test_3_1_1_refusals_are_link_refused(mosquitto: Broker) -> None:
    password = mosquitto.provision(AGENT_ID, GROUP_ID)

    async def scenario() -> None:
        agent = _agent_link(mosquitto, password, [])
        await agent.connect()
        with pytest.raises(LinkRefused) as denied:
            await agent.subscribe(OTHER_GROUP, qos=0)  # another group's documents: SUBACK 0x80
        assert (denied.value.operation, denied.value.reason_code) == (f"subscribe to {OTHER_GROUP}", 0x80)
        assert agent.connected  # a refused subscription keeps the connection
        await agent.close()

        wrong = _agent_link(mosquitto, "not-the-password", [])
        with pytest.raises(LinkRefused) as refused:
            await wrong.connect()
        # CONNACK 4 or 5 in 3.1.1 (bad user name or password, not authorised), as MQTT 5's 0x86/0x87.
        assert refused.value.operation == "connect" and refused.value.reason_code in NOT_AUTHORISED
        assert not wrong.connected

    _run(scenario)


# --- several brokers -----------------------------------------------------------------------------------


@pytest.fixture
def two_brokers(tmp_path: Path) -> Iterator[tuple[Broker, Broker]]:
    """Two Mosquittos with certificates from one CA (the nodes of one broker, as agents see them)."""
    require_mosquitto()
    ca = ManagerCA.generate("policycast test CA")
    brokers = (Broker(tmp_path / "b1", ca=ca).start(), Broker(tmp_path / "b2", ca=ca).start())
    try:
        yield brokers
    finally:
        for broker in brokers:
            broker.close()


def _provision(broker: Broker, password: str) -> None:
    accounts.provision_agent(
        broker.admin, prefix=DEFAULT_PREFIX, agent_id=AGENT_ID, group_id=GROUP_ID, password=password
    )


def _credentials(brokers: tuple[Broker, ...], password: str, **fields: Any) -> MqttCredentials:
    urls = [broker.url for broker in brokers]
    return MqttCredentials(
        url=urls[0], urls=urls, username=AGENT_ID, password=password, delivery=V311, **fields
    )


class Agent:
    """The whole agent (runtime: pull over a fake manager, push over real links), its identity on disk."""

    def __init__(
        self,
        key: SigningKey,
        settings: AgentSettings,
        credentials: MqttCredentials,
        ca: ManagerCA,
        seed: int,
        rng: random.Random | None = None,
    ) -> None:
        identity = make_identity(key).model_copy(
            update={
                "mqtt": StoredMqttCredentials.from_wire(credentials),
                "trusted_cas": [ca.certificate_pem.decode()],
            }
        )
        self.store = FileStateStore(settings.state_dir)
        self.store.save_identity(identity)
        self.core = AgentCore(identity=identity, store=self.store)
        self.manager = FakeManager(key.sign_envelope(make_doc(serial=1, mode="push")))
        self.runtime = AgentRuntime(
            self.core, self.manager, settings, MqttLink, rng=rng or random.Random(seed)
        )

    @property
    def port(self) -> int | None:
        link = self.runtime.push.link
        return link.address.port if isinstance(link, MqttLink) and link.connected else None

    async def on(self, broker: Broker, sessions: int = 1) -> None:
        """Wait until the agent's push session (number `sessions` or later) is up on `broker`."""
        push = self.runtime.push
        await wait_for_async(
            lambda: push.connected and push.sessions >= sessions and self.port == broker.port,
            timeout=WAIT_S,
            what=f"a push session on {broker.url}",
        )


def test_the_agent_fails_over_to_another_node_when_its_node_dies(
    key: SigningKey, two_brokers: tuple[Broker, Broker], push_settings: AgentSettings
) -> None:
    password = secrets.token_urlsafe(12)
    for broker in two_brokers:
        _provision(broker, password)
    ca = two_brokers[0].ca
    assert ca is not None
    agent = Agent(key, push_settings, _credentials(two_brokers, password), ca, seed=11)

    async def scenario() -> None:
        async with running(agent.runtime.run, stop_within=10):
            push = agent.runtime.push
            await wait_for_async(
                lambda: push.connected and agent.port is not None, timeout=WAIT_S, what="a push session"
            )
            first = next(b for b in two_brokers if b.port == agent.port)
            other = next(b for b in two_brokers if b is not first)
            first.stop()
            await agent.on(other, sessions=2)

    _run(scenario)


class _LowestRandom(random.Random):
    """Every jittered delay at its lowest: what the agent waits for at least."""

    def uniform(self, a: float, b: float) -> float:
        return a


def test_the_agents_of_a_dead_node_fail_over_without_waiting_out_the_back_off(
    key: SigningKey, two_brokers: tuple[Broker, Broker], push_settings: AgentSettings
) -> None:
    """The node went away, another has not failed: the pause before trying it is jittered from 0 (at
    most reconnect_min_s), not the back-off's floor of reconnect_min_s (30 s here: longer than the wait)."""
    password = secrets.token_urlsafe(12)
    for broker in two_brokers:
        _provision(broker, password)
    ca = two_brokers[0].ca
    assert ca is not None
    settings = push_settings.model_copy(update={"reconnect_min_s": 30.0, "reconnect_max_s": 60.0})
    credentials = _credentials(two_brokers, password)
    agent = Agent(key, settings, credentials, ca, seed=5, rng=_LowestRandom(5))

    async def scenario() -> None:
        async with running(agent.runtime.run, stop_within=10):
            push = agent.runtime.push
            await wait_for_async(
                lambda: push.connected and agent.port is not None, timeout=WAIT_S, what="a push session"
            )
            first = next(b for b in two_brokers if b.port == agent.port)
            other = next(b for b in two_brokers if b is not first)
            first.stop()
            await agent.on(other, sessions=2)

    _run(scenario)


def test_a_dead_node_in_the_list_is_skipped(
    key: SigningKey, two_brokers: tuple[Broker, Broker], push_settings: AgentSettings
) -> None:
    password = secrets.token_urlsafe(12)
    dead, alive = two_brokers
    _provision(alive, password)
    dead.stop()
    ca = alive.ca
    assert ca is not None
    for seed in range(3):  # whichever node a seed picks first, the agent ends up on the live one
        agent = Agent(key, push_settings, _credentials(two_brokers, password), ca, seed=seed)

        async def scenario(agent: Agent = agent) -> None:
            async with running(agent.runtime.run, stop_within=10):
                await agent.on(alive)

        _run(scenario)


# --- credentials replaced ------------------------------------------------------------------------------


def test_a_credentials_command_moves_the_agent_to_its_new_account(
    key: SigningKey, two_brokers: tuple[Broker, Broker], push_settings: AgentSettings
) -> None:
    """The bridge sends new credentials (another node and password, as a NATS re-scoped JWT would be) on
    the cmd topic: the agent ends its session cleanly and connects with them at once."""
    old, new = two_brokers
    old_password, new_password = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    _provision(old, old_password)
    _provision(new, new_password)
    assert old.ca is not None
    agent = Agent(key, push_settings, _credentials((old,), old_password), old.ca, seed=1)
    states: list[Message] = []
    command = {
        "command": "credentials",
        "id": "rotate-1",
        "issued_at": datetime.now(UTC).isoformat(),
        "mqtt": _credentials((new,), new_password).model_dump(mode="json"),
    }

    async def scenario() -> None:
        watcher = _bridge(new, states)
        await watcher.connect()
        await watcher.subscribe(STATE)
        bridge = _bridge(old)
        await bridge.connect()
        async with running(agent.runtime.run, stop_within=10):
            await agent.on(old)
            for _ in range(2):  # as the manager re-sends it (QoS 0 on NATS): acted on once
                await bridge.publish(Message(CMD, orjson.dumps(command), qos=1))
            await agent.on(new, sessions=2)
            await wait_for_async(
                lambda: any(orjson.loads(m.payload).get("online") is True for m in states if m.payload),
                timeout=WAIT_S,
                what="the agent online on its new broker",
            )
        await bridge.close()
        await watcher.close()

    _run(scenario)
    assert agent.runtime.push.sessions == 2
    stored = agent.store.load_identity()
    assert stored is not None and stored.mqtt is not None
    assert (stored.mqtt.password, stored.mqtt.url) == (new_password, new.url)


def test_a_heartbeat_brings_the_new_password_and_the_agent_reconnects_with_it(
    key: SigningKey, mosquitto: Broker, push_settings: AgentSettings
) -> None:
    """The broker changes the agent's password (and drops its session: Mosquitto does); the heartbeat's
    answer brings the new one, and the agent reconnects with it at once, not after its back-off."""
    first = secrets.token_urlsafe(12)
    _provision(mosquitto, first)
    expiry = datetime.now(UTC) + timedelta(hours=1)  # reported in heartbeats: the manager renews
    assert mosquitto.ca is not None
    settings = push_settings.model_copy(update={"reconnect_min_s": 30.0, "reconnect_max_s": 60.0})
    agent = Agent(key, settings, _credentials((mosquitto,), first, expires_at=expiry), mosquitto.ca, seed=2)

    async def scenario() -> None:
        async with running(agent.runtime.run, stop_within=10):
            await agent.on(mosquitto)
            second = secrets.token_urlsafe(12)
            _provision(mosquitto, second)  # the old password no longer works; the session is dropped
            await wait_for_async(lambda: not agent.runtime.push.connected, timeout=WAIT_S, what="dropped")
            renewed = _credentials((mosquitto,), second, expires_at=expiry + timedelta(hours=1))
            agent.manager.credentials = renewed
            agent.runtime.update_now()
            await agent.on(mosquitto, sessions=2)  # within WAIT_S: well before a 30 s back-off
            assert agent.runtime.push.link is not None
            assert agent.core.identity.mqtt is not None and agent.core.identity.mqtt.password == second

    _run(scenario)
    assert {request.mqtt_expires_at for request in agent.manager.requests} >= {int(expiry.timestamp())}
