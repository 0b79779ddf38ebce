"""Revocation and group moves on a real 3-node NATS cluster: the account JWT's revocation list, pushed
through the system account, reaches every node; a revoked agent is refused and disconnected; a
reconcile round pushes once for all its removals; a move sends the agent a JWT for its new group."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime

import orjson
import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from broker_bridge.reconcile import reconcile_accounts
from fabric_core.topics import cmd_topic, config_topic
from fabric_core.wire import AgentCommand
from manager_db.models import Agent
from tests.support.nats import NatsCluster, add_agent

pytestmark = pytest.mark.cluster
DISCONNECT_BOUND_S = 5.0


def new_id(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def test_a_connected_agent_is_disconnected_within_seconds_of_its_revocation_and_refused_after(
    nats_cluster: NatsCluster,
) -> None:
    engine, link = nats_cluster.engine, nats_cluster.link(node=0)
    agent_id = new_id("revoked")
    agent = nats_cluster.agent(agent_id, 1, node=2)
    bystander = nats_cluster.agent(new_id("bystander"), 1, node=2)
    pushed = time.monotonic()
    engine.remove(link, agent_id=agent_id)
    agent.wait_disconnected(timeout=DISCONNECT_BOUND_S)
    took = time.monotonic() - pushed
    print(f"revoked agent disconnected {took:.3f}s after the push")
    assert took <= DISCONNECT_BOUND_S
    for node in range(3):
        again = nats_cluster.engine.enrolment_credentials(agent_id, 1)  # even a JWT minted just now
        client = nats_cluster.client(agent_id, again.password, agent_id, node=node)
        try:
            reason = client.connect(timeout=5)
        except AssertionError:
            continue  # closed without a CONNACK: refused too
        assert reason.is_failure, f"node {node} let the revoked agent in"
    assert bystander.paho.is_connected()


def test_a_reconcile_round_pushes_once_for_all_its_removals(
    nats_cluster: NatsCluster, database: Engine
) -> None:
    engine, link = nats_cluster.engine, nats_cluster.link(node=1)
    add_agent(database, new_id("kept"), revoked=False, acl_group_id=None)
    reconcile_accounts(database, link, broker=engine)  # the first round also resyncs the account
    revoked = [new_id(f"gone{i}") for i in range(3)]
    connected = [nats_cluster.agent(agent_id, 1, node=i) for i, agent_id in enumerate(revoked)]
    for agent_id in revoked:
        add_agent(database, agent_id, revoked=True)
    pushes: list[dict[str, int]] = []
    original = engine._push
    engine._push = lambda revocations: (pushes.append(revocations), original(revocations))[-1]  # type: ignore[method-assign]
    try:
        assert reconcile_accounts(database, link, broker=engine) == 3
    finally:
        del engine._push
    assert len(pushes) == 1
    assert {engine.keys.agent_user(a).public_key for a in revoked} <= set(pushes[0])
    for client in connected:
        client.wait_disconnected(timeout=DISCONNECT_BOUND_S)
    assert reconcile_accounts(database, link, broker=engine) == 0  # recorded: nothing drifts any more


def test_a_moved_agent_gets_credentials_for_its_new_group_on_its_cmd_topic(nats_cluster: NatsCluster) -> None:
    prefix, engine = nats_cluster.prefix, nats_cluster.engine
    link = nats_cluster.link(node=1)  # the agent's node: interest crosses routes asynchronously
    agent_id = new_id("mover")
    agent = nats_cluster.agent(agent_id, 31, node=1)
    assert agent.subscribe(cmd_topic(prefix, agent_id), qos=0).value == 0
    engine.move(link, agent_id=agent_id, old_group_id=31, new_group_id=32)
    message = agent.expect(cmd_topic(prefix, agent_id))
    command = AgentCommand.model_validate(orjson.loads(message.payload))
    assert command.command == "credentials" and command.mqtt is not None
    assert command.mqtt.urls == [a.url for a in nats_cluster.addresses]
    link.publish(config_topic(prefix, 32, 1), b"new-group-doc", qos=1, retain=True)
    moved = nats_cluster.client(agent_id, command.mqtt.password, agent_id, node=2)
    assert not moved.connect().is_failure
    assert moved.subscribe(config_topic(prefix, 32, 1), qos=0).value == 0
    assert moved.expect(config_topic(prefix, 32, 1)).payload == b"new-group-doc"
    assert moved.subscribe(config_topic(prefix, 31, 1), qos=0).value == 0x80


def test_revocations_are_rebuilt_from_the_agents_table_and_old_ones_drop_out(
    nats_cluster: NatsCluster, database: Engine
) -> None:
    engine = nats_cluster.engine
    recent, old = new_id("recent"), new_id("old")
    add_agent(database, recent, revoked=True)
    add_agent(database, old, revoked=True)
    with Session(database) as session:
        row = session.get(Agent, old)
        assert row is not None
        row.revoked_at = datetime.fromtimestamp(time.time() - 2 * engine.settings.nats_credentials_ttl_s, UTC)
        session.add(row)
        session.commit()
    revocations = engine.revocations_from(database)
    assert engine.keys.agent_user(recent).public_key in revocations
    assert engine.keys.agent_user(old).public_key not in revocations
    # Two pushes in the same second still differ (nodes ignore a jti they hold).
    first, second = engine.account_jwt(revocations), engine.account_jwt(revocations)
    assert first.split(".")[1] != second.split(".")[1]
