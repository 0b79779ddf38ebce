"""Broker passwords, derived from the manager's signing key so that nothing stores them.

Whoever holds the shared signing key derives the same passwords: the api process that hands an agent
its password at enrolment, the bridge that (re)provisions the agent's broker account, and
`policycast broker-config`, which writes the bridge's own account into the broker's files.
"""

from __future__ import annotations

from fabric_core.settings import Settings
from fabric_core.signing import SigningKey


def agent_password(signing_key: SigningKey, agent_id: str) -> str:
    return signing_key.derive_secret(f"mqtt-agent:{agent_id}")


def bridge_password(settings: Settings, signing_key: SigningKey | None) -> str:
    """POLICYCAST_MQTT_PASSWORD, else derived from the signing key (which must then be given)."""
    if settings.mqtt_password is not None:
        return settings.mqtt_password.get_secret_value()
    if signing_key is None:
        raise ValueError("set POLICYCAST_MQTT_PASSWORD, or give the manager's signing key to derive it")
    return signing_key.derive_secret(f"mqtt-bridge:{settings.mqtt_username}")
