"""Broker credentials that change under a running agent (NATS JWTs), URL lists and MQTT 3.1.1 options,
against the fake link and fake manager: renewed by heartbeat or by the `credentials` command, stored,
used at once; expired ones not retried."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent_stub.broker_account import link_options
from agent_stub.core import AgentCore
from agent_stub.errors import LinkRefused
from agent_stub.runtime import AgentRuntime
from agent_stub.state import FileStateStore, Identity, StoredMqttCredentials
from fabric_core.settings import AgentSettings, MqttAddress
from fabric_core.signing import SigningKey
from fabric_core.wire import MqttCredentials, MqttDelivery
from tests.agent_stub.conftest import WAIT_S, make_doc, make_identity, running
from tests.agent_stub.fakes import CMD, HELD, Broker, FakeManager
from tests.support.waiting import wait_for_async

NATS = MqttDelivery(qos=0, persistent_session=False, protocol="3.1.1")
URLS = ["mqtts://n1.test:8883", "mqtts://n2.test:8883", "mqtts://n3.test:8883"]
LATER = datetime(2100, 1, 1, tzinfo=UTC)
MOVED = HELD.replace("/3/", "/4/")
"""The config topic of group 4, where `Rig.move_at_manager` puts the agent."""


def _credentials(password: str, *, expires_at: datetime | None = LATER, **fields: Any) -> MqttCredentials:
    given = {"url": URLS[0], "urls": URLS, "username": "agent-1", "delivery": NATS, **fields}
    return MqttCredentials(password=password, expires_at=expires_at, **given)


def _identity(key: SigningKey, credentials: MqttCredentials) -> Identity:
    return make_identity(key).model_copy(update={"mqtt": StoredMqttCredentials.from_wire(credentials)})


class Rig:
    """A runtime (pull and push) over a file store, the fake manager and the fake broker."""

    def __init__(self, key: SigningKey, settings: AgentSettings, credentials: MqttCredentials) -> None:
        self.key = key
        self.store = FileStateStore(settings.state_dir)
        identity = _identity(key, credentials)
        self.store.save_identity(identity)
        self.core = AgentCore(identity=identity, store=self.store)
        self.manager = FakeManager(key.sign_envelope(make_doc(serial=1, mode="push")))
        self.broker = Broker()
        self.runtime = AgentRuntime(
            self.core, self.manager, settings, self.broker.factory, rng=random.Random(4)
        )

    def run(self, scenario: Callable[[Rig], Awaitable[None]]) -> None:
        async def main() -> None:
            async with running(self.runtime.run, stop_within=10.0):
                await scenario(self)

        asyncio.run(main())

    def move_at_manager(self) -> None:
        """Move the agent to group 4 at the manager: its next heartbeat brings that group's document."""
        self.manager.envelope = self.key.sign_envelope(make_doc(serial=2, group_id=4, mode="push"))

    async def heartbeat(self) -> None:
        """Ask for a heartbeat now and wait until it has been sent."""
        count = len(self.manager.requests)
        self.runtime.update_now()
        await wait_for_async(lambda: len(self.manager.requests) > count, timeout=WAIT_S, what="a heartbeat")

    async def connected(self, count: int = 1) -> None:
        """Wait until the push session has come up `count` times in all."""
        await wait_for_async(
            lambda: self.runtime.push.sessions >= count and self.runtime.push.connected,
            timeout=WAIT_S,
            what=f"push session number {count}",
        )


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


# --- what the link is told -----------------------------------------------------------------------------


def test_link_options_carry_every_url_the_protocol_and_a_clean_session(
    key: SigningKey, push_settings: AgentSettings
) -> None:
    rng = random.Random(1)
    options = link_options(_identity(key, _credentials("jwt-1")), push_settings, rng=rng)
    assert options.nodes == tuple(MqttAddress.parse(url) for url in URLS)
    assert options.address == MqttAddress.parse(URLS[0]) and options.rng is rng
    assert (options.protocol, options.mqtt5, options.clean_start, options.session_expiry_s) == (
        "3.1.1",
        False,
        True,
        0,
    )
    assert "jwt-1" not in repr(options)


def test_an_older_enrolment_has_one_url_and_mqtt_5(key: SigningKey, push_settings: AgentSettings) -> None:
    options = link_options(make_identity(key, mqtt_url="mqtt://broker.test:1883"), push_settings)
    assert options.nodes == (MqttAddress("broker.test", 1883),) and options.addresses == ()
    assert options.protocol == "5" and options.mqtt5


# --- renewal by heartbeat ------------------------------------------------------------------------------


def test_heartbeats_report_the_expiry_and_an_answer_s_credentials_replace_them(
    key: SigningKey, push_settings: AgentSettings, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(key, push_settings, _credentials("jwt-1"))
    renewed = _credentials("jwt-2", expires_at=LATER + timedelta(hours=1))

    async def scenario(r: Rig) -> None:
        await r.connected()
        assert r.broker.connected_with == ["jwt-1"]
        r.manager.credentials = renewed
        r.runtime.update_now()
        await r.connected(2)
        count = len(r.manager.requests)
        r.runtime.update_now()
        await wait_for_async(lambda: len(r.manager.requests) > count, timeout=WAIT_S, what="a heartbeat")

    with caplog.at_level(logging.DEBUG):
        rig.run(scenario)
    assert {request.mqtt_expires_at for request in rig.manager.requests} >= {int(LATER.timestamp())}
    assert rig.manager.requests[-1].mqtt_expires_at == int((LATER + timedelta(hours=1)).timestamp())
    assert rig.broker.connected_with == ["jwt-1", "jwt-2"]
    # The old session ended cleanly (no will) before the new one began, and that one reported online.
    first_close = rig.broker.calls.index(("close", False))
    second_connect = [i for i, call in enumerate(rig.broker.calls) if call == ("connect",)][1]
    assert first_close < second_connect
    assert ("abort",) not in rig.broker.calls[:second_connect]
    # Stored, as the rest of the identity, and the secret never logged.
    stored = rig.store.load_identity()
    assert stored is not None and stored.mqtt is not None and stored.mqtt.password == "jwt-2"
    assert stored.mqtt.urls == URLS and stored.mqtt.delivery == NATS
    assert "jwt-1" not in caplog.text and "jwt-2" not in caplog.text
    assert "new broker credentials from heartbeat" in caplog.text


def test_agents_without_expiring_credentials_report_none(
    key: SigningKey, push_settings: AgentSettings
) -> None:
    rig = Rig(key, push_settings, _credentials("pw", expires_at=None))

    async def scenario(r: Rig) -> None:
        await r.connected()

    rig.run(scenario)
    assert {request.mqtt_expires_at for request in rig.manager.requests} == {None}


# --- renewal by command --------------------------------------------------------------------------------


def _command(credentials: MqttCredentials | None, command_id: str = "k-1") -> bytes:
    body: dict[str, Any] = {"command": "credentials", "id": command_id, "issued_at": "2026-12-01T00:00:00Z"}
    if credentials is not None:
        body["mqtt"] = credentials.model_dump(mode="json")
    return orjson.dumps(body)


def test_a_credentials_command_reconnects_once_with_them_and_bad_ones_are_dropped(
    key: SigningKey, push_settings: AgentSettings, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(key, push_settings, _credentials("jwt-1"))
    bad_url = _credentials("jwt-x", url="http://nowhere", urls=["http://nowhere"])

    async def scenario(r: Rig) -> None:
        await r.connected()
        link = r.broker.link
        link.deliver(CMD, _command(None, "k-0"))  # credentials without mqtt: malformed
        link.deliver(CMD, _command(bad_url, "k-bad"))  # unusable: dropped
        link.deliver(CMD, _command(_credentials("jwt-2")))
        link.deliver(CMD, _command(_credentials("jwt-2")))  # re-sent (QoS 0, until the agent acts)
        await r.connected(2)
        r.broker.link.deliver(CMD, _command(_credentials("jwt-2")))  # again, on the new session
        # Whatever the last command did, it is done once the next heartbeat is answered.
        r.runtime.update_now()
        count = len(r.manager.requests)
        await wait_for_async(lambda: len(r.manager.requests) > count, timeout=WAIT_S, what="a heartbeat")

    with caplog.at_level(logging.INFO):
        rig.run(scenario)
    assert rig.broker.connected_with == ["jwt-1", "jwt-2"]
    assert rig.runtime.push.sessions == 2
    stored = rig.store.load_identity()
    assert stored is not None and stored.mqtt is not None and stored.mqtt.password == "jwt-2"
    assert "credentials without mqtt" in caplog.text
    assert "dropped broker credentials from command" in caplog.text
    assert "jwt-" not in caplog.text


# --- expired credentials -------------------------------------------------------------------------------


def _not_authorised() -> LinkRefused:
    return LinkRefused("connect", ReasonCode(PacketTypes.CONNACK, "Not authorized"))


def test_expired_credentials_refused_wait_for_the_manager_instead_of_retrying(
    key: SigningKey, push_settings: AgentSettings, caplog: pytest.LogCaptureFixture
) -> None:
    past = datetime.now(UTC) - timedelta(minutes=5)
    rig = Rig(key, push_settings, _credentials("old-jwt", expires_at=past))
    rig.broker.connect_failures = [_not_authorised()] * 50

    async def scenario(r: Rig) -> None:
        await wait_for_async(
            lambda: any("expired at" in rec.getMessage() for rec in caplog.records),
            timeout=WAIT_S,
            what="the push loop waiting for new credentials",
        )
        # Heartbeats go on, for several reconnect back-offs (at most 0.1 s each here): no connect again.
        loop = asyncio.get_running_loop()
        until = loop.time() + 3 * push_settings.reconnect_max_s
        while loop.time() < until:
            await r.heartbeat()
        assert len(r.broker.named("connect")) == 1
        r.broker.connect_failures = []
        r.manager.credentials = _credentials("new-jwt")
        r.runtime.update_now()
        await r.connected()

    with caplog.at_level(logging.DEBUG, logger="agent_stub.push"):
        rig.run(scenario)
    assert rig.broker.connected_with == ["new-jwt"]
    assert all(request.mqtt_expires_at == int(past.timestamp()) for request in rig.manager.requests[:-1])
    waiting = [r for r in caplog.records if "expired at" in r.getMessage()]
    assert len(waiting) == 1 and waiting[0].levelno == logging.WARNING
    assert "waiting for the manager to renew them" in waiting[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_refusal_of_credentials_that_have_not_expired_is_retried(
    key: SigningKey, push_settings: AgentSettings
) -> None:
    rig = Rig(key, push_settings, _credentials("jwt-1"))  # expires in 2100
    rig.broker.connect_failures = [_not_authorised()] * 2

    async def scenario(r: Rig) -> None:
        await r.connected()

    rig.run(scenario)
    assert len(rig.broker.named("connect")) == 3
    assert rig.broker.connected_with == ["jwt-1"]


def test_a_subscription_follows_the_group_move_that_comes_with_new_credentials(
    key: SigningKey, push_settings: AgentSettings
) -> None:
    rig = Rig(key, push_settings, _credentials("jwt-g3"))

    async def scenario(r: Rig) -> None:
        await r.connected()
        r.move_at_manager()
        r.manager.credentials = _credentials("jwt-g4")
        r.runtime.update_now()
        await wait_for_async(
            lambda: r.runtime.push.sessions >= 2 and r.core.identity.group_id == 4,
            timeout=WAIT_S,
            what="a session in group 4",
        )
        await wait_for_async(
            lambda: ("subscribe", MOVED) in r.broker.calls, timeout=WAIT_S, what="the new group's topic"
        )

    rig.run(scenario)
    assert rig.broker.connected_with[-1] == "jwt-g4"


def test_new_credentials_that_refuse_the_held_group_make_the_agent_ask_the_manager_where_it_belongs(
    key: SigningKey, push_settings: AgentSettings
) -> None:
    # NATS: a move's new JWT arrives on the cmd topic before the new group's document, and the
    # "update now" sent with it can be lost while the agent reconnects (QoS 0).
    rig = Rig(key, push_settings, _credentials("jwt-g3"))

    async def scenario(r: Rig) -> None:
        await r.connected()
        r.move_at_manager()
        r.broker.refused_topics.add(HELD)  # the new JWT does not cover the old group
        r.broker.link.deliver(CMD, _command(_credentials("jwt-g4")))
        await wait_for_async(
            lambda: ("subscribe", MOVED) in r.broker.calls and r.runtime.push.connected,
            timeout=WAIT_S,
            what="a session on the new group's topic",
        )

    rig.run(scenario)
    assert rig.broker.connected_with[-1] == "jwt-g4"
    assert rig.core.identity.group_id == 4


def test_a_held_topic_refused_under_unchanged_credentials_asks_the_manager_once(
    key: SigningKey, push_settings: AgentSettings
) -> None:
    rig = Rig(key, push_settings, _credentials("jwt-1"))
    rig.broker.refused_topics.add(HELD)  # an ACL that is simply wrong: the manager has nothing new

    async def scenario(r: Rig) -> None:
        await wait_for_async(
            lambda: len([c for c in r.broker.calls if c == ("subscribe", HELD)]) >= 4,
            timeout=WAIT_S,
            what="several refused attempts",
        )

    rig.run(scenario)
    first_heartbeat = 1  # the one that brought the push document
    assert len(rig.manager.requests) == first_heartbeat + 1
