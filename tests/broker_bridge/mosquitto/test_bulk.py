"""Agent accounts written in bulk into the dynamic-security file (`broker_bridge.mosquitto.bulk`).

What they allow is tested with the control API's accounts in test_authorisation.py (both paths); here:
the broker holds the same accounts either way, the file is written safely, a fleet from the agents
table is recorded as provisioned and the bridge's reconcile leaves it alone.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from broker_bridge import reconcile
from broker_bridge.broker import BrokerLink
from broker_bridge.engine import BrokerLaunch
from broker_bridge.mosquitto import accounts, bulk, dynsec
from broker_bridge.mosquitto.config import BrokerLayout
from broker_bridge.mosquitto.control import control
from broker_bridge.mosquitto.engine import READY_MARKER, MosquittoEngine
from broker_bridge.mosquitto.install import mosquitto_binary
from broker_bridge.reconcile import reconcile_accounts
from fabric_core.broker_credentials import agent_password
from fabric_core.settings import MqttAddress, Settings
from fabric_core.signing import SigningKey
from fabric_core.tls import CA_FILE, client_context
from fabric_core.topics import DEFAULT_PREFIX, config_topic
from local_stack.broker_process import BrokerProcess
from manager_db.database import make_engine
from manager_db.models import Agent, Group
from tests.support.broker import Broker, MqttClient, require_mosquitto
from tests.support.processes import free_port, policycast, python_env

NOT_AUTHORISED = 0x87


def broker_view(link: BrokerLink, agent_id: str, group_id: int) -> dict[str, Any]:
    """What the running broker holds of an agent's account: its client and its two roles."""
    commands = [
        dynsec.get_client(agent_id),
        dynsec.get_role(dynsec.agent_role_name(agent_id)),
        dynsec.get_role(dynsec.group_role_name(group_id)),
    ]
    client, own, group = (r["data"] for r in dynsec.check(control(link, commands)))
    for role in (own, group):
        role["role"]["acls"] = sorted(role["role"]["acls"], key=lambda acl: (acl["acltype"], acl["topic"]))
    client["client"]["roles"] = sorted(client["client"]["roles"], key=lambda role: role["rolename"])
    return {"client": client["client"], "own": own["role"], "group": group["role"]}


def test_the_broker_holds_the_same_account_from_either_path(tmp_path: Path) -> None:
    require_mosquitto()
    broker = Broker(tmp_path / "mosquitto")
    try:
        broker.provision_many({"bulk1": 3})  # before the start
        broker.start()
        broker.provision("api1", 4)
        bulk_view, api_view = broker_view(broker.admin, "bulk1", 3), broker_view(broker.admin, "api1", 4)
    finally:
        broker.close()
    as_bulk1 = orjson.dumps(api_view).replace(b"api1", b"bulk1")
    as_bulk1 = as_bulk1.replace(b'"pc-group-4"', b'"pc-group-3"').replace(b"/config/4/", b"/config/3/")
    assert bulk_view == orjson.loads(as_bulk1)
    assert bulk_view["client"]["clientid"] == "bulk1"  # bound to its own client id, as createClient binds it


def test_a_bulk_write_keeps_what_the_file_holds_and_replaces_an_agents_account(tmp_path: Path) -> None:
    require_mosquitto()
    broker = Broker(tmp_path / "mosquitto").start()
    try:
        kept = broker.provision("api1", 1)  # through the control API, saved by the broker
        first = broker.provision_many({"a1": 1, "a2": 2})  # restarts the broker around the write
        second = broker.provision_many({"a1": 2})  # again: a new password and group, one account
        content = orjson.loads(broker.layout.dynsec_path.read_bytes())
        usernames = [client["username"] for client in content["clients"]]
        assert sorted(usernames) == sorted({*usernames}) and {"api1", "a1", "a2"} <= {*usernames}
        assert not broker.client("api1", kept).connect().is_failure
        assert broker.client("a1", first["a1"]).connect().value == NOT_AUTHORISED
        moved = broker.client("a1", second["a1"])
        assert not moved.connect().is_failure
        assert moved.subscribe(config_topic(broker.prefix, 1, 1)).value == NOT_AUTHORISED
        assert not moved.subscribe(config_topic(broker.prefix, 2, 1)).is_failure
        assert not broker.client("a2", first["a2"]).connect().is_failure
    finally:
        broker.close()


def test_the_file_is_replaced_atomically_and_stays_0600(tmp_path: Path) -> None:
    require_mosquitto()
    broker = Broker(tmp_path / "mosquitto")
    before = broker.layout.dynsec_path.stat().st_ino
    broker.provision_many({f"a{i}": i % 3 for i in range(50)})
    path = broker.layout.dynsec_path
    assert path.stat().st_ino != before  # a new file renamed over the old one, not rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_a_running_broker_refuses_a_bulk_write(tmp_path: Path) -> None:
    require_mosquitto()
    broker = Broker(tmp_path / "mosquitto").start()
    try:
        with pytest.raises(bulk.BrokerRunning, match="running"):
            bulk.write_agent_accounts(broker.layout, prefix=broker.prefix, agents=[("a1", 1, "x")])
    finally:
        broker.close()
    assert bulk.running_pid(broker.layout) is None  # stopped: the pid file is gone
    bulk.write_agent_accounts(broker.layout, prefix=broker.prefix, agents=[("a1", 1, "x")])


def test_a_thousand_accounts_in_one_write_all_connect(tmp_path: Path) -> None:
    require_mosquitto()
    broker = Broker(tmp_path / "mosquitto")
    passwords = broker.provision_many({f"a{i}": i % 10 for i in range(1000)})
    broker.start()
    try:
        for i in (0, 499, 999):
            client = broker.client(f"a{i}", passwords[f"a{i}"])
            assert not client.connect().is_failure
            assert not client.subscribe(config_topic(broker.prefix, i % 10, 1)).is_failure
            assert client.subscribe(config_topic(broker.prefix, (i + 1) % 10, 1)).value == NOT_AUTHORISED
    finally:
        broker.close()


# --- a fleet from the agents table --------------------------------------------------------------------


@pytest.fixture
def database(database_url: str) -> Iterator[Engine]:
    """Two groups; agents a1, a2 in the first, b1 in the second, and a revoked r1."""
    engine = make_engine(database_url)
    with Session(engine) as session:
        first, second = Group(name="First", inherit=False), Group(name="Second", inherit=False)
        session.add_all([first, second])
        session.commit()
        assert first.id is not None and second.id is not None
        for name, group in (("a1", first), ("a2", first), ("b1", second), ("r1", first)):
            assert group.id is not None
            session.add(Agent(id=name, hostname=name, group_id=group.id, secret_hash=f"hash-{name}"))
        session.commit()
        revoked = session.get(Agent, "r1")
        assert revoked is not None
        revoked.revoked_at = revoked.enrolled_at
        session.commit()
    yield engine
    engine.dispose()


def acl_groups(database: Engine) -> dict[str, int | None]:
    with Session(database) as session:
        return {a.id: a.acl_group_id for a in session.exec(select(Agent).order_by(col(Agent.id))).all()}


def groups(database: Engine) -> dict[str, int]:
    with Session(database) as session:
        return {agent.id: agent.group_id for agent in session.exec(select(Agent)).all()}


def test_a_fleet_written_in_bulk_is_recorded_and_reconcile_leaves_it_alone(
    tmp_path: Path, database: Engine
) -> None:
    require_mosquitto()
    broker = Broker(tmp_path / "mosquitto")
    key = SigningKey.generate()
    engine = MosquittoEngine(Settings(data_dir=tmp_path, mqtt_prefix=broker.prefix), key)
    assert bulk.provision_fleet(database, engine, broker.layout.directory) == 3  # not the revoked agent
    group_of = groups(database)
    assert acl_groups(database) == {**{a: group_of[a] for a in ("a1", "a2", "b1")}, "r1": None}
    broker.start()
    try:
        assert reconcile_accounts(database, broker.admin, broker=engine) == 0  # nothing to redo
        for agent_id in ("a1", "b1"):
            client = broker.client(agent_id, agent_password(key, agent_id))  # what enrolment hands out
            assert not client.connect().is_failure
            assert not client.subscribe(config_topic(broker.prefix, group_of[agent_id], 1)).is_failure
        other = broker.client("a2", agent_password(key, "a2"))
        assert not other.connect().is_failure
        assert other.subscribe(config_topic(broker.prefix, group_of["b1"], 1)).value == NOT_AUTHORISED
        assert broker.client("r1", agent_password(key, "r1")).connect().value == NOT_AUTHORISED
    finally:
        broker.close()


def test_a_fleet_write_covers_moved_agents_and_leaves_concurrent_changes_to_reconcile(
    tmp_path: Path, database: Engine
) -> None:
    group_of = groups(database)
    with Session(database) as session:
        moved = session.get(Agent, "a2")
        assert moved is not None
        moved.acl_group_id = group_of["b1"]  # the broker still gives it the other group
        session.commit()
    read = reconcile.active_agents(database)
    with Session(database) as session:  # a round provisions a1 between the read and the record
        raced = session.get(Agent, "a1")
        assert raced is not None
        raced.acl_group_id = group_of["b1"]
        session.commit()
    reconcile.record_provisioned(database, read)
    recorded = acl_groups(database)
    assert recorded["a2"] == group_of["a2"]  # written with its current group: recorded so
    assert recorded["a1"] == group_of["b1"]  # changed since the read: left for reconcile
    assert recorded["b1"] == group_of["b1"] and recorded["r1"] is None


def test_the_control_api_path_batches_several_agents_per_message(tmp_path: Path) -> None:
    require_mosquitto()
    broker = Broker(tmp_path / "mosquitto").start()
    try:
        broker.provision("a3", 1)  # exists already: reset, not an error
        agents: list[tuple[str, str | int, str]] = [(f"a{i}", i % 2, f"pw-{i}") for i in range(7)]
        messages = accounts.provision_agents(broker.admin, prefix=broker.prefix, agents=agents, per_message=3)
        assert messages == 3 + 1  # 7 agents 3 at a time, and one reset of the existing account
        for agent_id, group_id, _ in agents:
            assert broker_view(broker.admin, agent_id, int(group_id))["client"]["clientid"] == agent_id
        client = broker.client("a3", "pw-3")
        assert not client.connect().is_failure
        assert not client.subscribe(config_topic(broker.prefix, 1, 1)).is_failure
    finally:
        broker.close()


def test_broker_config_with_agents_writes_the_fleet_and_records_it(
    tmp_path: Path, database: Engine, database_url: str
) -> None:
    """`policycast broker-config --with-agents`: the active agents connect with what enrolment hands out
    as soon as the broker starts, and the table says they are provisioned."""
    require_mosquitto()
    key = SigningKey.generate()
    data, out, port = tmp_path / "data", tmp_path / "broker", free_port()
    env = python_env(
        POLICYCAST_DATA_DIR=str(data),
        POLICYCAST_DATABASE_URL=database_url,
        POLICYCAST_SIGNING_KEY=key.seed_base64,
        POLICYCAST_TLS_NAMES="127.0.0.1",
    )
    done = policycast("broker-config", "--out", str(out), "--port", str(port), "--with-agents", env=env)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "3 active agent(s)" in done.stdout
    group_of = groups(database)
    assert acl_groups(database) == {**{a: group_of[a] for a in ("a1", "a2", "b1")}, "r1": None}
    layout = BrokerLayout(out)
    argv = (mosquitto_binary(), "-c", str(layout.config_path))
    process = BrokerProcess(BrokerLaunch(argv, layout.log_path, READY_MARKER, "127.0.0.1", port))
    process.start()
    try:
        trust = client_context((Settings(data_dir=data).tls_dir / CA_FILE).read_bytes())
        address = MqttAddress("127.0.0.1", port, tls=True)
        client = MqttClient(address, "b1", agent_password(key, "b1"), ssl_context=trust)
        try:
            assert not client.connect().is_failure
            assert not client.subscribe(config_topic(DEFAULT_PREFIX, group_of["b1"], 1)).is_failure
            assert client.subscribe(config_topic(DEFAULT_PREFIX, group_of["a1"], 1)).value == NOT_AUTHORISED
        finally:
            client.close()
    finally:
        process.stop()
    again = policycast("broker-config", "--out", str(out), "--port", str(port), "--with-agents", env=env)
    assert again.returncode == 0, again.stderr  # the file is kept and the accounts rewritten: idempotent
