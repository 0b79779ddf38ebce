"""`NatsEngine` without a cluster (keys, credentials, refresh, settings), and `policycast broker-config
--engine nats` from the command line to a node an agent connects to."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from broker_bridge.engine import BrokerLaunch, engine_for
from broker_bridge.nats import jwt
from broker_bridge.nats.engine import NatsEngine
from broker_bridge.nats.keys import NatsKeys, NatsKeysMissing, keys_path, load_nats_keys
from fabric_core.settings import MqttAddress, Settings
from fabric_core.tls import ManagerCA, client_context
from local_stack.broker_cluster import BrokerCluster
from tests.support.broker import MqttClient
from tests.support.processes import free_port, python_env


def settings_in(tmp_path: Path, **values: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", broker_engine="nats", **values)  # type: ignore[arg-type]


def test_keys_are_made_once_0600_and_read_back_or_taken_from_the_setting(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    with pytest.raises(NatsKeysMissing, match="broker-config"):
        load_nats_keys(settings)
    made = load_nats_keys(settings, create=True)
    assert stat.S_IMODE(keys_path(settings).stat().st_mode) == 0o600
    assert load_nats_keys(settings).account.public_key == made.account.public_key
    assert made.operator.seed not in repr(made)
    given = NatsKeys.generate()
    from_env = load_nats_keys(settings_in(tmp_path / "other", nats_keys=SecretStr(given.to_json())))
    assert from_env.operator.public_key == given.operator.public_key
    with pytest.raises(ValueError, match="seeds"):
        NatsKeys.from_json('{"operator": "nope"}')


def test_enrolment_credentials_carry_every_node_a_jwt_and_its_expiry(tmp_path: Path) -> None:
    settings = settings_in(
        tmp_path,
        mqtt_url="mqtts://10.0.0.1:8883,mqtts://10.0.0.2:8883",
        mqtt_public_url="mqtts://a.example:8883, mqtts://b.example:8883",
        nats_credentials_ttl_s=600,
        mqtt_prefix="acme",
    )
    load_nats_keys(settings, create=True)
    engine = engine_for(settings, None)
    assert isinstance(engine, NatsEngine) and engine.delivery.protocol == "3.1.1" and engine.delivery.qos == 0
    credentials = engine.enrolment_credentials("a1", 4)
    assert credentials.url == "mqtts://a.example:8883"
    assert credentials.urls == ["mqtts://a.example:8883", "mqtts://b.example:8883"]
    assert credentials.username == "a1" and credentials.prefix == "acme"
    assert credentials.expires_at is not None
    assert abs(credentials.expires_at.timestamp() - (time.time() + 600)) < 5
    claims = jwt.decode(credentials.password, "user", now=time.time())
    assert claims["iss"] == engine.keys.account.public_key
    assert claims["sub"] == engine.keys.agent_user("a1").public_key
    assert claims["nats"]["pub"] == {"allow": ["acme.v1.agents.a1.state"]}
    assert claims["nats"]["sub"] == {"allow": ["acme.v1.config.4.*", "acme.v1.agents.a1.cmd"]}
    assert claims["nats"]["bearer_token"] is True
    assert claims["nats"]["allowed_connection_types"] == ["MQTT"]
    assert settings.mqtt_addresses == [
        MqttAddress("10.0.0.1", 8883, True),
        MqttAddress("10.0.0.2", 8883, True),
    ]
    assert settings.nats_url_list == ["tls://10.0.0.1:4222", "tls://10.0.0.2:4222"]


def test_credentials_are_refreshed_in_the_second_half_of_their_life_or_after_a_move(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, nats_credentials_ttl_s=3600)
    load_nats_keys(settings, create=True)
    engine = NatsEngine(settings, None)
    now = int(time.time())
    assert engine.refreshed_credentials("a1", 1, expires_at=now + 3000, document_changed=False) is None
    assert engine.refreshed_credentials("a1", 1, expires_at=now + 1000, document_changed=False) is not None
    assert engine.refreshed_credentials("a1", 1, expires_at=None, document_changed=False) is not None
    moved = engine.refreshed_credentials("a1", 2, expires_at=now + 3000, document_changed=True)
    assert moved is not None
    assert jwt.decode(moved.password)["nats"]["sub"]["allow"][0].endswith(".config.2.*")


def test_the_bridge_jwt_reads_and_writes_under_the_prefix_for_mqtt_only(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, mqtt_prefix="pc")
    load_nats_keys(settings, create=True)
    username, token = NatsEngine(settings, None).bridge_credentials()
    claims = jwt.decode(token, "user")["nats"]
    assert username == settings.mqtt_username
    assert claims["pub"] == {"allow": ["pc.>"]}
    assert claims["sub"] == {"allow": ["pc.>", "$MQTT.sub.>"]}
    assert "exp" not in jwt.decode(token)


def test_the_nats_engine_listens_on_tls_only(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    with pytest.raises(ValueError, match="TLS only"):
        NatsEngine(settings, None).write_config(tmp_path / "b", bind="127.0.0.1", tls=None, plain_port=1883)


@pytest.mark.cluster
def test_broker_config_writes_a_node_an_agent_connects_to(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ca = ManagerCA.load_or_create(data_dir / "tls")
    mqtt, client, monitor = free_port(), free_port(), free_port()
    env = python_env(POLICYCAST_DATA_DIR=str(data_dir), COLUMNS="80")
    argv = [
        sys.executable,
        "-m",
        "local_stack",
        "broker-config",
        "--engine",
        "nats",
        "--out",
        str(tmp_path / "b"),
    ]
    argv += [
        "--bind",
        "127.0.0.1",
        "--port",
        str(mqtt),
        "--client-port",
        str(client),
        "--monitor-port",
        str(monitor),
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert f"127.0.0.1:{mqtt}" in done.stdout and "POLICYCAST_NATS_URLS" in done.stdout
    launch = BrokerLaunch(
        argv=(
            str(Path(sys.executable).parent / "nats-server"),
            "-c",
            str(tmp_path / "b/node-1/nats-server.conf"),
        ),
        log_path=tmp_path / "b/node-1/nats-server.log",
        ready_marker=b"Server is ready",
        host="127.0.0.1",
        port=mqtt,
        monitor_url=f"http://127.0.0.1:{monitor}",
    )
    settings = Settings(data_dir=data_dir, broker_engine="nats")
    credentials = NatsEngine(settings, None).enrolment_credentials("cli-agent", 1)
    with BrokerCluster([launch]):
        agent = MqttClient(
            MqttAddress("127.0.0.1", mqtt, tls=True),
            "cli-agent",
            credentials.password,
            ssl_context=client_context(ca.certificate_pem),
            protocol="3.1.1",
        )
        try:
            assert not agent.connect().is_failure
            assert agent.subscribe("policycast/v1/config/1/1", qos=0).value == 0
        finally:
            agent.close()
