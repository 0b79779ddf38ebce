"""Push mode end to end against the broker under test, on both engines (`tests.support.engines`): a
real Mosquitto (dynamic security, the agent on its own account and ACLs, the bridge on its own) and a
real 3-node NATS cluster (the agent on its JWT, QoS 0 on clean sessions over MQTT 3.1.1, the bridge on
its own JWT): retained documents, bad input, commands, presence, group and location moves, and falling
back to pull while the broker is away.

One broker per module and engine (`broker`): each test has its own agent id and group, so that what
the broker retains for one test (documents, states) is not another's. The test that stops the broker
starts its own (`own_broker`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent_stub.core import AgentCore
from agent_stub.mqtt_link import Message, MqttLink
from agent_stub.push import PushLoop
from agent_stub.runtime import AgentRuntime
from agent_stub.state import MemoryStateStore
from fabric_core.settings import AgentSettings
from fabric_core.signing import SigningKey
from fabric_core.topics import DEFAULT_PREFIX, cmd_topic, config_topic, state_topic
from fabric_core.wire import AgentCommand
from tests.agent_stub.conftest import (
    GROUP_ID,
    LOCATION_ID,
    WAIT_S,
    broker_identity,
    make_doc,
    make_identity,
    running,
)
from tests.agent_stub.fakes import FakeManager
from tests.support.engines import ENGINES, PushBroker, start_push_broker
from tests.support.waiting import wait_for_async

_GROUPS = itertools.count(GROUP_ID * 100)


@dataclass(frozen=True)
class Ids:
    """One test's agent and group (a broker is shared by the module's tests), and their topics."""

    agent_id: str
    group_id: int
    location_id: int = LOCATION_ID

    @property
    def config(self) -> str:
        return config_topic(DEFAULT_PREFIX, self.group_id, self.location_id)

    @property
    def cmd(self) -> str:
        return cmd_topic(DEFAULT_PREFIX, self.agent_id)

    @property
    def state(self) -> str:
        return state_topic(DEFAULT_PREFIX, self.agent_id)

    def doc(self, **fields: Any) -> dict[str, Any]:
        """`make_doc` for this test's group (unless told otherwise)."""
        return make_doc(**{"group_id": self.group_id, **fields})


class Bridge:
    """Stands in for broker_bridge (publishes documents and commands) and for the manager's state ingest,
    with the bridge's rights: one link per broker node, the first subscribed to the agent's state."""

    def __init__(self, broker: PushBroker, ids: Ids) -> None:
        self.ids = ids
        self.qos = broker.delivery.qos  # on NATS, QoS 0: core NATS, in order from each node
        self.states: list[dict[str, Any]] = []
        self.markers: list[bytes] = []
        name = f"bridge-{uuid.uuid4().hex[:6]}"
        self.links = [
            MqttLink(broker.bridge_link_options(f"{name}-{node}", node=node), self._received)
            for node in range(broker.nodes)
        ]
        self.link = self.links[0]

    def _received(self, message: Message) -> None:
        if message.topic != self.ids.state:
            return
        if message.payload.startswith(b"marker-"):
            self.markers.append(message.payload)
        else:
            self.states.append(orjson.loads(message.payload))

    async def start(self) -> Bridge:
        for link in self.links:
            await link.connect()
        await self.link.subscribe(self.ids.state, qos=self.qos)
        return self

    async def close(self) -> None:
        for link in self.links:
            await link.close()

    async def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        await self.link.publish(Message(topic, payload, qos=1, retain=retain))

    async def settle(self) -> None:
        """Return once every state the broker took in before now has reached the bridge: a marker
        published now on the state topic (not retained) comes after them, as a node forwards what it
        takes in in order. Nodes do not order among themselves, so a marker goes out from every node:
        whichever the agent published on, its marker came after its states."""
        sent = []
        for link in self.links:
            marker = f"marker-{secrets.token_hex(6)}".encode()
            await link.publish(Message(self.ids.state, marker, qos=1, retain=False))
            sent.append(marker)
        await wait_for_async(
            lambda: all(m in self.markers for m in sent), timeout=WAIT_S, what="every node's marker"
        )

    @property
    def last(self) -> dict[str, Any]:
        return self.states[-1] if self.states else {}

    async def reported(self, **fields: Any) -> dict[str, Any]:
        """Wait until the last state the agent reported holds `fields` (True is not 1); return it."""

        def holds() -> bool:
            last = self.last
            return all(k in last and type(last[k]) is type(v) and last[k] == v for k, v in fields.items())

        await wait_for_async(holds, timeout=WAIT_S, what=lambda: f"a state with {fields}; got {self.states}")
        return self.last


def _agent(key: SigningKey, broker: PushBroker, ids: Ids, **doc: Any) -> AgentCore:
    """An agent holding serial 1 of a push document (what its first heartbeat would have brought)."""
    identity = broker_identity(key, broker, agent_id=ids.agent_id, group_id=ids.group_id)
    core = AgentCore(identity=identity, store=MemoryStateStore(identity))
    assert core.offer(key.sign_envelope(ids.doc(serial=1, mode="push", **doc)), "heartbeat").applied
    return core


def _push(core: AgentCore, settings: AgentSettings, commands: list[AgentCommand]) -> PushLoop:
    def on_command(command: AgentCommand) -> None:
        commands.append(command)
        if command.command == "credentials" and command.mqtt is not None:
            core.adopt_credentials(command.mqtt, source="command")  # as `AgentRuntime` does

    return PushLoop(core, MqttLink, settings, on_command, rng=random.Random(5))


def _run(
    broker: PushBroker,
    ids: Ids,
    loop_under_test: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    scenario: Callable[[Bridge], Awaitable[None]],
    *,
    before: Callable[[Bridge], Awaitable[None]] | None = None,
) -> Bridge:
    """Start a bridge, run `before`, start the loop, run `scenario`, stop the loop."""

    async def main() -> Bridge:
        bridge = await Bridge(broker, ids).start()
        if before is not None:
            await before(bridge)
        async with running(loop_under_test, stop_within=5):
            await scenario(bridge)
        await bridge.settle()  # the agent's last state (acknowledged before it disconnected) is in
        await bridge.close()
        return bridge

    return asyncio.run(asyncio.wait_for(main(), timeout=30))


def _started(engine: str, directory: Path) -> Iterator[PushBroker]:
    broker = start_push_broker(engine, directory, directory / "data")
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="module", params=ENGINES)
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PushBroker]:
    """One broker per engine for the module's tests that leave it running (each has its own `ids`)."""
    yield from _started(request.param, tmp_path_factory.mktemp(f"push-{request.param}"))


@pytest.fixture(params=ENGINES)
def own_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PushBroker]:
    """A broker of the test's own, for a test that stops it (NATS: the whole cluster)."""
    yield from _started(request.param, tmp_path / "broker")


@pytest.fixture
def ids() -> Ids:
    return Ids(agent_id=f"agent-{uuid.uuid4().hex[:8]}", group_id=next(_GROUPS))


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


def test_a_late_joiner_applies_the_retained_document_and_reports_online(
    key: SigningKey, broker: PushBroker, ids: Ids, push_settings: AgentSettings
) -> None:
    core = _agent(key, broker, ids)
    push = _push(core, push_settings, [])

    async def before(bridge: Bridge) -> None:
        await bridge.publish(ids.config, key.sign_envelope(ids.doc(serial=4, mode="push")))

    async def scenario(bridge: Bridge) -> None:
        await wait_for_async(lambda: core.serial == 4, timeout=WAIT_S, what="core.serial == 4")
        state = await bridge.reported(serial=4)
        assert state["online"] is True and state["mode"] == "push"
        assert (state["agent_id"], state["group_id"], state["location_id"]) == (
            ids.agent_id,
            ids.group_id,
            LOCATION_ID,
        )
        assert push.connected

    bridge = _run(broker, ids, push.run, scenario, before=before)
    # Stopped: the agent said so itself, retained (the will was not needed).
    assert bridge.last["online"] is False and bridge.last["serial"] == 4


def test_a_document_published_while_connected_is_applied_at_once(
    key: SigningKey, broker: PushBroker, ids: Ids, push_settings: AgentSettings
) -> None:
    core = _agent(key, broker, ids)
    push = _push(core, push_settings, [])

    async def scenario(bridge: Bridge) -> None:
        await bridge.reported(online=True)
        await bridge.publish(ids.config, key.sign_envelope(ids.doc(serial=2, mode="push")))
        await wait_for_async(lambda: core.serial == 2, timeout=WAIT_S, what="core.serial == 2")
        await bridge.reported(serial=2)

    _run(broker, ids, push.run, scenario)


def test_forged_unsigned_and_older_documents_are_not_applied(
    key: SigningKey,
    broker: PushBroker,
    ids: Ids,
    push_settings: AgentSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    core = _agent(key, broker, ids)
    push = _push(core, push_settings, [])

    async def scenario(bridge: Bridge) -> None:
        await wait_for_async(lambda: push.connected, timeout=WAIT_S, what="push.connected")
        await bridge.publish(ids.config, key.sign_envelope(ids.doc(serial=5, mode="push")))
        await wait_for_async(lambda: core.serial == 5, timeout=WAIT_S, what="core.serial == 5")
        forged = SigningKey.generate().sign_envelope(ids.doc(serial=9, mode="push"))
        unsigned = orjson.dumps(ids.doc(serial=9, mode="push"))
        tampered = orjson.loads(key.sign_envelope(ids.doc(serial=9, mode="push")))
        tampered["doc"]["policies"] = {}
        older = key.sign_envelope(ids.doc(serial=3, mode="push"))
        for payload in (forged, unsigned, orjson.dumps(tampered), older, b"\x00garbage"):
            await bridge.publish(ids.config, payload, retain=False)
        # A valid document after the bad ones: once it is applied, the bad ones have all been seen.
        await bridge.publish(ids.config, key.sign_envelope(ids.doc(serial=6, mode="push")))
        await wait_for_async(lambda: core.serial == 6, timeout=WAIT_S, what="core.serial == 6")

    with caplog.at_level(logging.DEBUG, logger="agent_stub.core"):
        _run(broker, ids, push.run, scenario)
    messages = [r.getMessage() for r in caplog.records]
    applied = [m for m in messages if m.startswith("applied serial") and m.endswith("from mqtt")]
    assert [m.split()[2] for m in applied] == ["5", "6"]
    assert sum("rejected a document from mqtt" in m for m in messages) == 4
    assert any("ignored serial 3 from mqtt" in m for m in messages)


def test_an_update_now_command_reaches_on_command(
    key: SigningKey, broker: PushBroker, ids: Ids, push_settings: AgentSettings
) -> None:
    core = _agent(key, broker, ids)
    commands: list[AgentCommand] = []
    push = _push(core, push_settings, commands)

    async def scenario(bridge: Bridge) -> None:
        await wait_for_async(lambda: push.connected, timeout=WAIT_S, what="push.connected")
        await bridge.publish(ids.cmd, b'{"command": "update_now"}', retain=False)  # malformed: dropped
        command = b'{"command": "update_now", "id": "c-1", "issued_at": "2024-05-01T12:00:00Z"}'
        await bridge.publish(ids.cmd, command, retain=False)
        await wait_for_async(lambda: len(commands) == 1, timeout=WAIT_S, what="len(commands) == 1")

    _run(broker, ids, push.run, scenario)
    assert (commands[0].command, commands[0].id) == ("update_now", "c-1")


def test_on_a_clean_session_at_qos_0_documents_flow_and_a_switch_to_pull_ends_cleanly(
    key: SigningKey, broker: PushBroker, ids: Ids, push_settings: AgentSettings
) -> None:
    """What a broker engine without persistent sessions asks for (`MqttDelivery`): NATS's own; on
    Mosquitto, asked for here in the agent's credentials."""
    core = _agent(key, broker, ids)
    held = core.identity.mqtt
    assert held is not None
    delivery = held.delivery.model_copy(update={"qos": 0, "persistent_session": False})
    core.identity = core.identity.model_copy(update={"mqtt": held.model_copy(update={"delivery": delivery})})
    push = _push(core, push_settings, [])

    async def before(bridge: Bridge) -> None:
        await bridge.publish(ids.config, key.sign_envelope(ids.doc(serial=4, mode="push")))

    async def scenario(bridge: Bridge) -> None:
        await wait_for_async(
            lambda: core.serial == 4, timeout=WAIT_S, what="core.serial == 4"
        )  # retained, sent to the new subscription
        await bridge.publish(ids.config, key.sign_envelope(ids.doc(serial=5, mode="push")), retain=False)
        await wait_for_async(lambda: core.serial == 5, timeout=WAIT_S, what="core.serial == 5")
        await bridge.publish(ids.config, key.sign_envelope(ids.doc(serial=6, mode="pull")))
        await bridge.reported(online=False)

    bridge = _run(broker, ids, push.run, scenario, before=before)
    assert bridge.last["mode"] == "pull" and bridge.last["serial"] == 6
    assert push.sessions == 1 and not push.connected


def test_the_will_says_offline_when_the_connection_dies_and_the_agent_comes_back(
    key: SigningKey, broker: PushBroker, ids: Ids, push_settings: AgentSettings
) -> None:
    core = _agent(key, broker, ids)
    push = _push(core, push_settings, [])

    async def scenario(bridge: Bridge) -> None:
        await bridge.reported(online=True)
        assert push.link is not None
        sessions = push.sessions
        push.link.abort()  # the connection dies without DISCONNECT
        will = {"agent_id": ids.agent_id, "online": False}
        await wait_for_async(lambda: bridge.last == will, timeout=WAIT_S, what=f"bridge.last == {will}")
        # ...and the agent reconnects by itself (back-off) and says it is online again. (A new
        # session, counted: paho may first re-send an unacknowledged state of the old one.)
        await wait_for_async(lambda: push.sessions > sessions, timeout=WAIT_S, what="a new session")
        await bridge.reported(online=True)

    _run(broker, ids, push.run, scenario)


def test_a_location_move_moves_the_subscription(
    key: SigningKey, broker: PushBroker, ids: Ids, push_settings: AgentSettings
) -> None:
    core = _agent(key, broker, ids)
    push = _push(core, push_settings, [])
    other = config_topic(DEFAULT_PREFIX, ids.group_id, LOCATION_ID + 1)

    async def scenario(bridge: Bridge) -> None:
        await wait_for_async(lambda: push.connected, timeout=WAIT_S, what="push.connected")
        # A heartbeat moves the agent to another location.
        moved = key.sign_envelope(ids.doc(serial=10, mode="push", location_id=LOCATION_ID + 1))
        assert core.offer(moved, "heartbeat").applied
        await bridge.reported(location_id=LOCATION_ID + 1)
        # The old location's document is no longer heard; the new one's is.
        await bridge.publish(ids.config, key.sign_envelope(ids.doc(serial=11, mode="push")))
        await bridge.publish(
            other, key.sign_envelope(ids.doc(serial=12, mode="push", location_id=LOCATION_ID + 1))
        )
        await wait_for_async(lambda: core.serial == 12, timeout=WAIT_S, what="core.serial == 12")
        assert core.location_id == LOCATION_ID + 1

    _run(broker, ids, push.run, scenario)


def test_a_group_the_account_may_not_read_is_refused_until_the_bridge_moves_the_account(
    key: SigningKey,
    broker: PushBroker,
    ids: Ids,
    push_settings: AgentSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A heartbeat moved the agent to another group before the bridge moved its broker account: the
    broker refuses the new group's config topic, and the agent keeps trying until it may read it
    (`PushBroker.move`: Mosquitto moves the account on the broker; NATS sends a JWT for the group)."""
    old_group_id = ids.group_id + 1
    identity = broker_identity(key, broker, agent_id=ids.agent_id, group_id=old_group_id)
    core = AgentCore(identity=identity, store=MemoryStateStore(identity))
    assert core.offer(key.sign_envelope(ids.doc(serial=1, mode="push")), "heartbeat").applied
    assert core.identity.group_id == ids.group_id
    push = _push(core, push_settings, [])

    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]

    async def before(bridge: Bridge) -> None:
        await bridge.publish(ids.config, key.sign_envelope(ids.doc(serial=4, mode="push")))

    async def scenario(bridge: Bridge) -> None:
        await wait_for_async(lambda: bool(refusals()), timeout=WAIT_S, what="a refusal")
        assert core.serial == 1 and not push.connected
        broker.move(ids.agent_id, old_group_id=old_group_id, new_group_id=ids.group_id)
        await wait_for_async(
            lambda: core.serial == 4, timeout=WAIT_S, what="core.serial == 4"
        )  # the retained document, on the topic it may now read
        await bridge.reported(serial=4, online=True)

    with caplog.at_level(logging.ERROR, logger="agent_stub.push"):
        _run(broker, ids, push.run, scenario, before=before)
    assert f"subscribe to {ids.config}" in refusals()[0]


# --- the runtime: fallback to pull, and switching modes ---------------------------------------------


def _runtime(
    key: SigningKey, broker: PushBroker, ids: Ids, settings: AgentSettings
) -> tuple[AgentRuntime, FakeManager]:
    identity = broker_identity(key, broker, agent_id=ids.agent_id, group_id=ids.group_id)
    core = AgentCore(identity=identity, store=MemoryStateStore(identity))
    manager = FakeManager(key.sign_envelope(ids.doc(serial=1, mode="push")))
    return AgentRuntime(core, manager, settings, rng=random.Random(6)), manager


def test_the_runtime_falls_back_to_pull_while_the_broker_is_away(
    key: SigningKey, own_broker: PushBroker, ids: Ids, push_settings: AgentSettings
) -> None:
    """The broker stops (NATS: every node of the cluster) and starts again."""
    runtime, manager = _runtime(key, own_broker, ids, push_settings)

    async def scenario(bridge: Bridge) -> None:
        await wait_for_async(
            lambda: runtime.transport == "push", timeout=WAIT_S, what='runtime.transport == "push"'
        )
        await bridge.close()
        own_broker.stop()
        await wait_for_async(
            lambda: runtime.transport == "pull", timeout=WAIT_S, what='runtime.transport == "pull"'
        )
        assert not runtime.push.connected
        runtime.update_now()  # heartbeats go on, and say pull
        await wait_for_async(
            lambda: manager.requests[-1].mode == "pull",
            timeout=WAIT_S,
            what='manager.requests[-1].mode == "pull"',
        )
        own_broker.start()
        await wait_for_async(
            lambda: runtime.transport == "push", timeout=WAIT_S, what='runtime.transport == "push"'
        )
        assert runtime.push.sessions == 2
        await bridge.start()  # a session of its own again, subscribed again

    _run(own_broker, ids, runtime.run, scenario)
    assert runtime.core.status.transport is None


def test_the_runtime_follows_mode_changes(
    key: SigningKey, broker: PushBroker, ids: Ids, push_settings: AgentSettings
) -> None:
    runtime, manager = _runtime(key, broker, ids, push_settings)

    async def scenario(bridge: Bridge) -> None:
        await bridge.reported(online=True)
        assert runtime.transport == "push"
        # The operator switches the group to pull: the bridge publishes it.
        await bridge.publish(ids.config, key.sign_envelope(ids.doc(serial=2, mode="pull")))
        await bridge.reported(online=False)
        assert bridge.last["mode"] == "pull" and bridge.last["serial"] == 2
        # (runtime.core.transport: mypy holds runtime.transport to the "push" asserted above)
        await wait_for_async(lambda: runtime.core.transport == "pull", timeout=WAIT_S, what="transport pull")
        # Back to push, learnt from a heartbeat this time.
        manager.envelope = key.sign_envelope(ids.doc(serial=3, mode="push"))
        runtime.update_now()
        await bridge.reported(online=True, serial=3)
        assert runtime.transport == "push"

    _run(broker, ids, runtime.run, scenario)


def test_stopping_does_not_wait_for_a_silent_broker(key: SigningKey, push_settings: AgentSettings) -> None:
    """No broker engine at all: a socket that never answers MQTT."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts TCP, never answers MQTT
        identity = make_identity(key, mqtt_url=f"mqtt://127.0.0.1:{silent.getsockname()[1]}")
        core = AgentCore(identity=identity, store=MemoryStateStore(identity))
        assert core.offer(key.sign_envelope(make_doc(serial=1, mode="push")), "heartbeat").applied
        settings = push_settings.model_copy(update={"request_timeout_s": 30.0})
        push = _push(core, settings, [])

        async def main() -> float:
            loop = asyncio.get_running_loop()
            silent.setblocking(False)
            stop = asyncio.Event()
            task = asyncio.create_task(push.run(stop))
            # Connecting: TCP accepted and CONNECT sent; the CONNACK never comes.
            connection, _ = await asyncio.wait_for(loop.sock_accept(silent), timeout=WAIT_S)
            with connection:
                assert await asyncio.wait_for(loop.sock_recv(connection, 1), timeout=WAIT_S) == b"\x10"
                stop.set()
                started = time.monotonic()
                await asyncio.wait_for(task, timeout=30)
                return time.monotonic() - started

        assert asyncio.run(main()) < 5  # not the 30 s connect timeout
    assert not push.connected
