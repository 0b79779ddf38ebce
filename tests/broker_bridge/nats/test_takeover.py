"""The takeover guard (broker_bridge.nats.takeover): `judge` on events without a broker, and on a real
3-node cluster another agent's JWT under an agent's client id is kicked within seconds, the victim
gets its client id back, and the taker, trying again, is revoked."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker_bridge.nats import credentials
from broker_bridge.nats.engine import NatsEngine
from broker_bridge.nats.keys import NatsKeys
from broker_bridge.nats.takeover import Strikes, TakeoverGuard, judge
from fabric_core.topics import cmd_topic
from tests.support.broker import MqttClient
from tests.support.nats import NatsCluster

KICK_BOUND_S = 5.0


def new_id(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


# --- the decision, without a broker ------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> NatsKeys:
    return NatsKeys.generate()


def event(keys: NatsKeys, *, client_id: str, token: str, **client: Any) -> dict[str, Any]:
    return {
        "type": "io.nats.server.advisory.v1.client_connect",
        "server": {"id": "NSERVER", "name": "policycast-1"},
        "client": {
            "id": 42,
            "acc": keys.account.public_key,
            "user": client_id,  # the MQTT username: the client chooses it
            "jwt": token,
            "client_type": "mqtt",
            "client_id": client_id,
            **client,
        },
    }


def verdict(keys: NatsKeys, **kwargs: Any) -> Any:
    return judge(
        event(keys, **kwargs),
        account=keys.account.public_key,
        agent_key=lambda agent_id: keys.agent_user(agent_id).public_key,
        bridge_key=keys.bridge_user().public_key,
    )


def agent_token(keys: NatsKeys, agent_id: str) -> str:
    return credentials.agent_jwt(
        keys, prefix="fleet", agent_id=agent_id, group_id=1, expires=int(time.time()) + 3600
    )


def test_an_agent_under_its_own_client_id_is_allowed(keys: NatsKeys) -> None:
    assert verdict(keys, client_id="a", token=agent_token(keys, "a")).action == "allow"


def test_another_agents_key_under_an_agents_client_id_is_kicked_naming_both(keys: NatsKeys) -> None:
    found = verdict(keys, client_id="a", token=agent_token(keys, "b"), user="a")
    assert found.action == "kick"
    assert (found.client_id, found.offender, found.server, found.cid) == ("a", "b", "NSERVER", 42)
    assert found.offender_key == keys.agent_user("b").public_key


def test_an_agent_under_any_other_client_id_is_kicked(keys: NatsKeys) -> None:
    assert verdict(keys, client_id="not-an-agent", token=agent_token(keys, "b")).action == "kick"


def test_the_bridge_under_its_random_client_id_and_non_mqtt_or_other_accounts_are_allowed(
    keys: NatsKeys,
) -> None:
    bridge = credentials.bridge_jwt(keys, prefix="fleet")
    assert verdict(keys, client_id="policycast-bridge-1f2e", token=bridge).action == "allow"
    token = agent_token(keys, "b")
    assert verdict(keys, client_id="a", token=token, client_type="nats").action == "allow"
    assert verdict(keys, client_id="a", token=token, acc="AOTHER").action == "allow"


def test_a_connection_without_a_verifiable_jwt_is_kicked_and_nobody_is_blamed(keys: NatsKeys) -> None:
    token = agent_token(keys, "b")
    head, body, _ = token.split(".")
    for broken in ("", "garbage", f"{head}.{body}.AAAA"):
        found = verdict(keys, client_id="a", token=broken)
        assert found.action == "kick" and found.offender_key is None
    other = NatsKeys.generate()  # another account's agent JWT, presented as this account's
    found = verdict(keys, client_id="a", token=agent_token(other, "a"))
    assert found.action == "kick" and found.offender_key is None


def test_a_second_takeover_within_the_window_is_a_repeat() -> None:
    strikes = Strikes(window_s=60)
    assert not strikes.record("UKEY", 0.0)
    assert strikes.record("UKEY", 30.0)
    assert not strikes.record("UOTHER", 30.0)
    assert not strikes.record("UKEY", 200.0)  # long after: a first offence again


# --- on a real cluster -------------------------------------------------------------------------------


@pytest.fixture
def guard(nats_cluster: NatsCluster) -> Iterator[TakeoverGuard]:
    """The engine's guard, watching through node 0, once connect events from every node reach it."""
    engine = nats_cluster.engine
    engine.watch(until=time.monotonic() + 600)
    guard = engine.guard
    assert guard is not None and guard.ready.wait(10)
    try:
        for node in range(3):  # interest in the events crosses the routes asynchronously
            for _ in range(50):
                probe_id = new_id("probe")
                probe = nats_cluster.agent(probe_id, 1, node=node)
                seen = guard.wait_for(lambda seen=probe_id: seen in guard.allowed, timeout=0.2)
                probe.close()
                if seen:
                    break
            else:
                raise AssertionError(f"the guard never saw a connection on node {node}")
        yield guard
    finally:
        engine.stop_watching()


def reconnect(cluster: NatsCluster, agent_id: str, *, node: int, timeout: float = 10.0) -> MqttClient:
    """The victim's agent back-off: connect again until a connection holds the client id (one
    within a second of a takeover is jailed and closed by NATS)."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        credentials = cluster.engine.enrolment_credentials(agent_id, 1)
        client = cluster.client(agent_id, credentials.password, agent_id, node=node)
        try:
            if not client.connect(timeout=3).is_failure:
                topic = cmd_topic(cluster.prefix, agent_id)
                if client.subscribe(topic).value == 0:
                    cluster.received_before_marker(client, topic, node=node)  # it holds the session
                    return client
        except AssertionError:
            pass
        client.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"{agent_id} never got its client id back")
        time.sleep(delay)  # the agent's own back-off, not a wait for the guard
        delay = min(delay * 2, 1.0)


def take_over(cluster: NatsCluster, victim: str, taker: str, *, node: int) -> MqttClient:
    """The taker's JWT connecting under the victim's client id, not waiting for the CONNACK (the
    guard may close it before one)."""
    token = cluster.engine.enrolment_credentials(taker, 1).password
    client = cluster.client(victim, token, victim, node=node)
    client.paho.connect(client.address.host, client.address.port, keepalive=30)
    client.paho.loop_start()
    return client


@pytest.mark.cluster
def test_a_takeover_is_kicked_the_victim_gets_its_id_back_and_a_repeat_taker_is_revoked(
    nats_cluster: NatsCluster, guard: TakeoverGuard, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="broker_bridge.nats.takeover")
    engine: NatsEngine = nats_cluster.engine
    victim, taker = new_id("victim"), new_id("taker")
    bystander = nats_cluster.agent(new_id("bystander"), 1, node=1)
    holder = nats_cluster.agent(victim, 1, node=1)
    began = time.monotonic()
    thief = take_over(nats_cluster, victim, taker, node=2)  # from another node
    thief.wait_disconnected(timeout=KICK_BOUND_S)
    kicked_in = time.monotonic() - began
    print(f"takeover kicked {kicked_in:.3f}s after the taker's CONNECT")
    assert kicked_in <= KICK_BOUND_S
    assert guard.wait_for(lambda: (victim, taker) in [(k.client_id, k.offender) for k in guard.kicked], 5)
    holder.wait_disconnected(timeout=KICK_BOUND_S)  # NATS gave the session to the taker meanwhile
    holder = reconnect(nats_cluster, victim, node=1)
    assert not guard.revoked

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(victim in w and taker in w and "SECURITY" in w for w in warnings)
    assert not any("eyJ" in w for w in warnings)  # never a JWT

    offender_key = engine.keys.agent_user(taker).public_key
    repeated = time.monotonic()
    again = take_over(nats_cluster, victim, taker, node=0)
    again.wait_disconnected(timeout=KICK_BOUND_S)
    assert guard.wait_for(lambda: offender_key in guard.revoked, timeout=KICK_BOUND_S)
    print(f"repeat taker revoked {time.monotonic() - repeated:.3f}s after its second takeover")
    reconnect(nats_cluster, victim, node=1)
    for node in range(3):  # even a JWT minted now, under its own client id
        own = nats_cluster.client(taker, engine.enrolment_credentials(taker, 1).password, taker, node=node)
        try:
            assert own.connect(timeout=5).is_failure, f"node {node} let the revoked taker in"
        except AssertionError as exc:
            assert "CONNACK" in str(exc), exc  # closed without a CONNACK: refused too
    assert bystander.paho.is_connected()
    assert any("revoking" in r.getMessage() and taker in r.getMessage() for r in caplog.records)
