"""`MosquittoEngine`: what an agent gets at enrolment (its account, the password derived from the
manager's key, QoS 1 on a persistent session) is what the broker lets it connect with."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from broker_bridge.mosquitto.engine import MosquittoEngine
from fabric_core.settings import Settings
from fabric_core.signing import SigningKey
from fabric_core.topics import cmd_topic
from tests.support.broker import Broker


def same_key(key: SigningKey) -> SigningKey:
    """The key as another process loads it (an api replica, the bridge, `policycast broker-config`)."""
    return SigningKey.from_seed_base64(key.seed_base64)


def test_enrolment_credentials_carry_the_account_and_the_delivery_options(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        mqtt_url="mqtt://10.0.0.1:1883",
        mqtt_public_url="mqtt://broker.example:8883",
        mqtt_prefix="pc",
    )
    engine = MosquittoEngine(settings, SigningKey.generate())

    credentials = engine.enrolment_credentials("a1", 3)

    assert credentials.url == "mqtt://broker.example:8883"  # as agents reach it, not as the bridge does
    assert (credentials.username, credentials.prefix) == ("a1", "pc")
    assert "delivery" in credentials.model_fields_set  # the engine's choice, not the wire's default
    assert (credentials.delivery.qos, credentials.delivery.persistent_session) == (1, True)


def test_the_agent_password_is_derived_from_the_managers_key(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    key = SigningKey.generate()

    def password(signing_key: SigningKey, agent_id: str) -> str:
        return MosquittoEngine(settings, signing_key).enrolment_credentials(agent_id, 1).password

    mine = password(key, "a1")
    assert password(same_key(key), "a1") == mine  # every process holding the key hands out the same
    # ... and it is the agent's own: not another agent's, not another manager's, not the bridge's.
    assert password(key, "a2") != mine
    assert password(SigningKey.generate(), "a1") != mine
    assert mine not in MosquittoEngine(settings, key).bridge_credentials()
    assert len(mine) >= 20


def test_the_bridge_password_is_the_setting_or_derived_from_the_key(tmp_path: Path) -> None:
    given = Settings(data_dir=tmp_path, mqtt_password=SecretStr("from-the-operator"))
    assert MosquittoEngine(given, None).bridge_credentials() == ("policycast-bridge", "from-the-operator")

    settings, key = Settings(data_dir=tmp_path), SigningKey.generate()
    username, password = MosquittoEngine(settings, key).bridge_credentials()
    assert username == "policycast-bridge"
    assert MosquittoEngine(settings, same_key(key)).bridge_credentials() == (username, password)
    assert MosquittoEngine(settings, SigningKey.generate()).bridge_credentials()[1] != password
    with pytest.raises(ValueError, match="POLICYCAST_MQTT_PASSWORD"):
        MosquittoEngine(settings, None).bridge_credentials()


def test_a_provisioned_agent_connects_with_its_enrolment_credentials(
    mosquitto: Broker, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, mqtt_url=mosquitto.url, mqtt_prefix=mosquitto.prefix)
    key = SigningKey.generate()
    credentials = MosquittoEngine(settings, key).enrolment_credentials("a1", 1)
    early = mosquitto.client(credentials.username, credentials.password, client_id=credentials.username)
    assert early.connect().is_failure  # no account before the bridge provisions it
    early.close()

    MosquittoEngine(settings, same_key(key)).provision(mosquitto.admin, agent_id="a1", group_id=1)

    agent = mosquitto.client(credentials.username, credentials.password, client_id=credentials.username)
    assert not agent.connect(clean_start=not credentials.delivery.persistent_session).is_failure
    assert not agent.subscribe(cmd_topic(mosquitto.prefix, "a1")).is_failure
