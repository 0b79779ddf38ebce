"""PushLoop against a fake link: subscriptions, state reports, commands, back-off, switching to pull."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from agent_stub.broker_account import push_blocker
from agent_stub.core import AgentCore
from agent_stub.errors import LinkUnavailable
from agent_stub.mqtt_link import LinkOptions, MessageHandler
from agent_stub.push import PushLoop, backoff_s, state_report, will_payload
from agent_stub.state import MemoryStateStore, StoredMqttCredentials
from fabric_core.settings import AgentSettings
from fabric_core.signing import SigningKey
from fabric_core.topics import cmd_topic, config_topic
from fabric_core.wire import AgentCommand, MqttDelivery
from tests.agent_stub.conftest import GROUP_ID, LOCATION_ID, WAIT_S, make_doc, make_identity, running
from tests.agent_stub.fakes import CMD, HELD, PREFIX, STATE, Broker, FakeLink
from tests.support.waiting import wait_for_async


class Harness:
    def __init__(self, core: AgentCore, key: SigningKey, settings: AgentSettings) -> None:
        self.core = core
        self.key = key
        self.broker = Broker()
        self.commands: list[AgentCommand] = []
        self.connection: list[bool] = []
        self.push = PushLoop(
            core,
            self.broker.factory,
            settings,
            self.commands.append,
            on_connection=self.connection.append,
            rng=random.Random(1),
        )

    def envelope(self, **doc: Any) -> bytes:
        return self.key.sign_envelope(make_doc(**{"mode": "push", **doc}))

    def run(self, scenario: Callable[[Harness], Awaitable[None]], *, stop_after: bool = True) -> None:
        async def main() -> None:
            async with running(self.push.run, stop_within=10.0, stop_at_end=stop_after):
                await scenario(self)

        asyncio.run(main())


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def core(key: SigningKey) -> AgentCore:
    core = AgentCore(
        identity=make_identity(key, mqtt_url="mqtt://broker.test:1883"), store=MemoryStateStore()
    )
    assert core.offer(key.sign_envelope(make_doc(serial=1, mode="push")), "test").applied
    return core


@pytest.fixture
def harness(core: AgentCore, key: SigningKey, push_settings: AgentSettings) -> Harness:
    return Harness(core, key, push_settings)


# --- when push applies ---------------------------------------------------------------------------------


def test_push_needs_a_push_document_and_usable_credentials(key: SigningKey) -> None:
    store = MemoryStateStore()
    core = AgentCore(identity=make_identity(key, mqtt_url="mqtt://broker.test:1883"), store=store)
    assert push_blocker(core) == "no document yet"
    core.offer(key.sign_envelope(make_doc(serial=1, mode="pull")), "test")
    assert push_blocker(core) == "the document says pull"
    core.offer(key.sign_envelope(make_doc(serial=2, mode="push")), "test")
    assert push_blocker(core) is None

    core.identity = make_identity(key)  # enrolled without broker credentials
    assert "no broker credentials" in (push_blocker(core) or "")
    core.identity = make_identity(key, mqtt_url="http://not-a-broker")
    assert "unusable broker settings" in (push_blocker(core) or "")
    bad_prefix = StoredMqttCredentials(url="mqtt://b:1883", username="u", password="p", mqtt_prefix="a/#")
    core.identity = core.identity.model_copy(update={"mqtt": bad_prefix})
    assert "unusable broker settings" in (push_blocker(core) or "")


# --- the session ---------------------------------------------------------------------------------------


def test_connects_subscribes_to_its_topics_and_reports_online(
    harness: Harness, push_settings: AgentSettings
) -> None:
    async def scenario(h: Harness) -> None:
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")

    harness.run(scenario)
    broker = harness.broker
    options = broker.link.options
    assert (options.client_id, options.username, options.password) == ("agent-1", "agent-1", "mqtt-s3cret")
    assert (options.address.host, options.address.port) == ("broker.test", 1883)
    assert options.clean_start is False
    assert options.session_expiry_s == push_settings.mqtt_session_expiry_s
    assert options.keepalive_s == push_settings.mqtt_keepalive_s
    assert options.will is not None and options.will.topic == STATE
    assert (options.will.qos, options.will.retain) == (1, True)
    assert orjson.loads(options.will.payload) == {"agent_id": "agent-1", "online": False}

    assert broker.named("subscribe") == [("subscribe", CMD), ("subscribe", HELD)]
    online = broker.named("publish")[0]
    assert (online[1], online[3], online[4]) == (STATE, 1, True)
    report = orjson.loads(online[2])
    assert report["online"] is True and report["mode"] == "push"
    assert (report["serial"], report["group_id"], report["location_id"]) == (1, GROUP_ID, LOCATION_ID)
    assert report["agent_id"] == "agent-1" and "at" in report
    assert harness.connection == [True, False]
    # Stopped, not switched to pull: offline said, and the broker keeps the session for the restart.
    assert broker.states()[-1]["online"] is False and "mode" not in broker.states()[-1]
    assert broker.calls[-1] == ("close", False)


def test_a_document_from_the_broker_is_applied_and_reported(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")
        h.broker.link.deliver(HELD, h.envelope(serial=2))
        assert h.core.serial == 2  # applied synchronously, before the PUBACK goes out
        await wait_for_async(
            lambda: h.broker.states()[-1]["serial"] == 2,
            timeout=WAIT_S,
            what='h.broker.states()[-1]["serial"] == 2',
        )

    harness.run(scenario)
    assert [s["serial"] for s in harness.broker.states() if s["online"]] == [1, 2]


def test_bad_documents_are_dropped_with_a_log_line(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(h: Harness) -> None:
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")
        link = h.broker.link
        link.deliver(HELD, h.envelope(serial=3))
        link.deliver(HELD, SigningKey.generate().sign_envelope(make_doc(serial=9, mode="push")))  # forged
        link.deliver(HELD, orjson.dumps({"doc": make_doc(serial=9), "kid": h.key.verify_key.kid}))  # unsigned
        link.deliver(HELD, h.envelope(serial=2))  # older
        link.deliver(HELD, b"\xff not json")
        # Validly signed, but for another location than its topic says.
        link.deliver(HELD, h.envelope(serial=9, location_id=LOCATION_ID + 1))

    with caplog.at_level(logging.DEBUG, logger="agent_stub.core"):
        harness.run(scenario)
    assert harness.core.serial == 3 and harness.core.location_id == LOCATION_ID
    rejected = [r.getMessage() for r in caplog.records if "rejected a document from mqtt" in r.getMessage()]
    assert len(rejected) == 4 and "expected (group 3, location 7)" in rejected[-1]
    assert any("ignored serial 2 from mqtt" in r.getMessage() for r in caplog.records)


def test_subscription_follows_a_location_change_from_a_heartbeat(harness: Harness) -> None:
    other = config_topic(PREFIX, GROUP_ID, LOCATION_ID + 1)

    async def scenario(h: Harness) -> None:
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")
        assert h.core.offer(h.envelope(serial=5, location_id=LOCATION_ID + 1), "heartbeat").applied
        # Still subscribed there: a document of the location left behind must not move the agent back.
        h.broker.link.deliver(HELD, h.envelope(serial=6))
        assert h.core.location_id == LOCATION_ID + 1
        await wait_for_async(
            lambda: ("unsubscribe", HELD) in h.broker.calls,
            timeout=WAIT_S,
            what='("unsubscribe", HELD) in h.broker.calls',
        )
        h.broker.link.deliver(other, h.envelope(serial=7, location_id=LOCATION_ID + 1))
        assert h.core.serial == 7
        await wait_for_async(
            lambda: h.broker.states()[-1]["serial"] == 7,
            timeout=WAIT_S,
            what='h.broker.states()[-1]["serial"] == 7',
        )

    harness.run(scenario)
    moves = [c for c in harness.broker.calls if c[0] in ("subscribe", "unsubscribe")]
    # New topic first, then the old one left: no moment without a subscription.
    assert moves == [("subscribe", CMD), ("subscribe", HELD), ("subscribe", other), ("unsubscribe", HELD)]
    assert harness.broker.states()[-2]["location_id"] == LOCATION_ID + 1


def test_subscription_follows_a_group_move(harness: Harness) -> None:
    new_group = config_topic(PREFIX, GROUP_ID + 1, LOCATION_ID)

    async def scenario(h: Harness) -> None:
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")
        assert h.core.offer(h.envelope(serial=5, group_id=GROUP_ID + 1), "heartbeat").applied
        await wait_for_async(
            lambda: ("unsubscribe", HELD) in h.broker.calls,
            timeout=WAIT_S,
            what='("unsubscribe", HELD) in h.broker.calls',
        )

    harness.run(scenario)
    assert ("subscribe", new_group) in harness.broker.calls
    assert harness.broker.states()[-2]["group_id"] == GROUP_ID + 1


def test_a_leftover_subscription_of_an_earlier_session_is_left(harness: Harness) -> None:
    leftover = config_topic(PREFIX, GROUP_ID, 99)

    async def scenario(h: Harness) -> None:
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")
        h.broker.link.deliver(leftover, h.envelope(serial=8, location_id=99))
        await wait_for_async(
            lambda: ("unsubscribe", leftover) in h.broker.calls,
            timeout=WAIT_S,
            what='("unsubscribe", leftover) in h.broker.calls',
        )

    harness.run(scenario)
    assert harness.core.serial == 1


def test_after_a_reconnect_it_subscribes_again_and_leaves_what_it_no_longer_holds(harness: Harness) -> None:
    other = config_topic(PREFIX, GROUP_ID, LOCATION_ID + 1)

    async def scenario(h: Harness) -> None:
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")
        h.broker.session_present = True
        h.broker.link.drop()
        await wait_for_async(lambda: not h.push.connected, timeout=WAIT_S, what="not h.push.connected")
        h.broker.connect_failures = [LinkUnavailable("broker down")]
        # Moved by a heartbeat while the broker is away.
        assert h.core.offer(h.envelope(serial=5, location_id=LOCATION_ID + 1), "heartbeat").applied
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")
        await wait_for_async(
            lambda: ("unsubscribe", HELD) in h.broker.calls,
            timeout=WAIT_S,
            what='("unsubscribe", HELD) in h.broker.calls',
        )

    harness.run(scenario)
    after = harness.broker.calls[harness.broker.calls.index(("connect",), 1) :]
    assert ("subscribe", other) in after and ("unsubscribe", HELD) in after
    assert len(harness.broker.links) == 1  # one paho client per agent, reconnected
    assert harness.connection[:3] == [True, False, True]
    assert harness.push.sessions == 2


def test_switching_to_pull_ends_the_session_and_the_loop(harness: Harness) -> None:
    async def scenario(h: Harness) -> None:
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")
        h.broker.link.deliver(HELD, h.envelope(serial=2, mode="pull"))

    harness.run(scenario, stop_after=False)  # returns by itself
    last = harness.broker.states()[-1]
    assert last["online"] is False and last["mode"] == "pull" and last["serial"] == 2
    assert harness.broker.calls[-1] == ("close", True)  # the broker drops the session too
    assert harness.push.connected is False and harness.connection[-1] is False


# --- commands ------------------------------------------------------------------------------------------


def test_update_now_command_is_forwarded_once_and_bad_ones_are_dropped(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    command = b'{"command": "update_now", "id": "c-1", "issued_at": "2024-05-01T12:00:00Z"}'

    async def scenario(h: Harness) -> None:
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")
        link = h.broker.link
        link.deliver(CMD, command)
        link.deliver(CMD, command)  # QoS 1 may deliver twice
        link.deliver(CMD, b'{"command": "format_disk", "id": "c-2", "issued_at": "2024-05-01T12:00:00Z"}')
        link.deliver(CMD, b'{"command": "update_now"}')
        link.deliver(CMD, b"not json")

    with caplog.at_level(logging.WARNING, logger="agent_stub.push"):
        harness.run(scenario)
    assert [(c.command, c.id) for c in harness.commands] == [("update_now", "c-1")]
    assert sum("dropped a malformed command" in r.getMessage() for r in caplog.records) == 3


# --- back-off ------------------------------------------------------------------------------------------


class MaxRandom(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_doubles_up_to_the_cap_with_jitter_in_bounds() -> None:
    assert [backoff_s(n, 0.5, 4.0, MaxRandom()) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff_s(10_000, 0.5, 4.0, MaxRandom()) == 4.0  # no overflow after a long outage
    rng = random.Random(3)
    delays = [backoff_s(n, 0.5, 4.0, rng) for n in range(1, 60)]
    assert all(0.5 <= d <= 4.0 for d in delays)
    assert len(set(delays[5:])) > 20  # jittered: a fleet does not reconnect in step


class MinRandom(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


def _pauses(harness: Harness, fails_over: list[bool], rng: random.Random) -> list[float]:
    """The pauses the push loop takes after failures, the link failing over (True) or not after each."""
    settings = AgentSettings(reconnect_min_s=1.0, reconnect_max_s=60.0)
    push = PushLoop(harness.core, harness.broker.factory, settings, harness.commands.append, rng=rng)
    link = push._new_link()
    assert isinstance(link, FakeLink)
    pauses = []
    for over in fails_over:
        harness.broker.fails_over = over
        pauses.append(push._failed("push session: lost"))
    return pauses


def test_a_failover_to_an_untried_node_is_jittered_from_zero_up_to_reconnect_min(harness: Harness) -> None:
    """A dead node's agents all lost it at the same instant: they move to the other nodes within
    reconnect_min_s, spread over it, not all at once after it."""
    pauses = _pauses(harness, [True] * 200, random.Random(7))
    assert all(0.0 <= p <= 1.0 for p in pauses)
    assert min(pauses) < 0.1 and max(pauses) > 0.9 and len(set(pauses)) == len(pauses)
    assert _pauses(harness, [True] * 5, MaxRandom()) == [1.0] * 5  # a failover never grows the back-off


def test_the_back_off_grows_only_once_no_untried_node_is_left(harness: Harness) -> None:
    # Lost, failed over to the second node (failed), then to the third (failed): every node failed.
    assert _pauses(harness, [True, True, False, False, False], MaxRandom()) == [1.0, 1.0, 1.0, 2.0, 4.0]
    assert _pauses(harness, [True, True, False, False, False], MinRandom()) == [0.0, 0.0, 1.0, 1.0, 1.0]
    # One node (Mosquitto), or a refusal on a connected node: the back-off from the first failure on.
    assert _pauses(harness, [False] * 4, MaxRandom()) == [1.0, 2.0, 4.0, 8.0]


def test_a_lost_session_fails_over_at_once_when_another_node_is_untried(
    core: AgentCore, key: SigningKey, push_settings: AgentSettings
) -> None:
    # A back-off floor far beyond the wait: only a failover comes back within it.
    settings = push_settings.model_copy(update={"reconnect_min_s": 30.0, "reconnect_max_s": 60.0})
    harness = Harness(core, key, settings)
    harness.push._rng = MinRandom(1)
    harness.broker.fails_over = True

    async def scenario(h: Harness) -> None:
        await wait_for_async(lambda: h.push.sessions == 1, timeout=WAIT_S, what="the first session")
        h.broker.link.drop()  # the node died
        await wait_for_async(lambda: h.push.sessions == 2, timeout=WAIT_S, what="a session on another node")

    harness.run(scenario)
    assert harness.connection[:3] == [True, False, True]


def test_connect_failures_back_off_and_log_once(
    harness: Harness, push_settings: AgentSettings, caplog: pytest.LogCaptureFixture
) -> None:
    harness.broker.connect_failures = [LinkUnavailable("connection refused")] * 4
    times: list[float] = []

    async def scenario(h: Harness) -> None:
        loop = asyncio.get_running_loop()
        original = h.broker.factory

        def timed(options: LinkOptions, on_message: MessageHandler) -> FakeLink:
            link = original(options, on_message)
            connect = link.connect

            async def timed_connect() -> bool:
                times.append(loop.time())
                return await connect()

            link.connect = timed_connect  # type: ignore[method-assign]
            return link

        h.push._link_factory = timed
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")

    with caplog.at_level(logging.DEBUG, logger="agent_stub.push"):
        harness.run(scenario)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 4
    assert all(push_settings.reconnect_min_s * 0.9 <= g <= push_settings.reconnect_max_s + 0.05 for g in gaps)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "connection refused" in warnings[0].getMessage()
    assert any("up again after 4 failed attempt(s)" in r.getMessage() for r in caplog.records)


def test_a_refused_subscription_drops_the_connection_and_retries(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.broker.refused_topics = {HELD}

    async def scenario(h: Harness) -> None:
        await wait_for_async(
            lambda: len(h.broker.named("abort")) >= 2,
            timeout=WAIT_S,
            what='len(h.broker.named("abort")) >= 2',
        )
        assert not h.push.connected
        h.broker.refused_topics = set()  # the manager provisioned the ACL
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")

    with caplog.at_level(logging.ERROR, logger="agent_stub.push"):
        harness.run(scenario)
    assert "Not authorized" in caplog.text


# --- payloads ------------------------------------------------------------------------------------------


def test_state_payloads(core: AgentCore) -> None:
    online = orjson.loads(state_report(core, online=True, mode="push"))
    assert set(online) == {"agent_id", "online", "serial", "group_id", "location_id", "mode", "at"}
    offline = orjson.loads(state_report(core, online=False, mode=None))
    assert offline["online"] is False and "mode" not in offline
    assert orjson.loads(will_payload("agent-1")) == {"agent_id": "agent-1", "online": False}


def test_the_topic_prefix_comes_from_the_stored_credentials(
    key: SigningKey, push_settings: AgentSettings
) -> None:
    credentials = StoredMqttCredentials(url="mqtt://b:1883", username="u", password="p", mqtt_prefix="acme")
    identity = make_identity(key).model_copy(update={"mqtt": credentials})
    core = AgentCore(identity=identity, store=MemoryStateStore())
    core.offer(key.sign_envelope(make_doc(serial=1, mode="push")), "test")
    harness = Harness(core, key, push_settings)

    async def scenario(h: Harness) -> None:
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")

    harness.run(scenario)
    assert harness.broker.named("subscribe") == [
        ("subscribe", cmd_topic("acme", "agent-1")),
        ("subscribe", config_topic("acme", GROUP_ID, LOCATION_ID)),
    ]


# --- what the broker engine asks for ---------------------------------------------------------------


def test_the_default_delivery_is_qos_1_on_a_persistent_session(
    harness: Harness, push_settings: AgentSettings
) -> None:
    async def scenario(h: Harness) -> None:
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")

    harness.run(scenario)
    options = harness.broker.link.options
    assert (options.clean_start, options.session_expiry_s) == (False, push_settings.mqtt_session_expiry_s)
    assert harness.broker.subscribed_qos == [(CMD, 1), (HELD, 1)]


def test_qos_0_without_a_persistent_session_subscribes_at_qos_0_on_a_clean_session(
    key: SigningKey, push_settings: AgentSettings
) -> None:
    identity = make_identity(key, mqtt_url="mqtt://broker.test:1883")
    assert identity.mqtt is not None
    clean = identity.mqtt.model_copy(update={"delivery": MqttDelivery(qos=0, persistent_session=False)})
    core = AgentCore(identity=identity.model_copy(update={"mqtt": clean}), store=MemoryStateStore())
    assert core.offer(key.sign_envelope(make_doc(serial=1, mode="push")), "test").applied
    harness = Harness(core, key, push_settings)

    async def scenario(h: Harness) -> None:
        await wait_for_async(lambda: h.push.connected, timeout=WAIT_S, what="h.push.connected")
        other = h.envelope(serial=2, location_id=LOCATION_ID + 1)
        assert h.core.offer(other, source="heartbeat").applied  # the subscription follows, at QoS 0
        await wait_for_async(
            lambda: ("unsubscribe", HELD) in h.broker.calls,
            timeout=WAIT_S,
            what='("unsubscribe", HELD) in h.broker.calls',
        )

    harness.run(scenario)
    options = harness.broker.link.options
    assert (options.clean_start, options.session_expiry_s) == (True, 0)
    other_topic = config_topic(PREFIX, GROUP_ID, LOCATION_ID + 1)
    assert harness.broker.subscribed_qos == [(CMD, 0), (HELD, 0), (other_topic, 0)]
    # The will and the state reports are publications: unchanged.
    assert options.will is not None and (options.will.qos, options.will.retain) == (1, True)
    online = harness.broker.named("publish")[0]
    assert (online[1], online[3], online[4]) == (STATE, 1, True)
