"""What the NATS engine mints: the operator's and accounts' JWTs, and the users' (agents, bridge,
system user), with their permissions as NATS subjects built from `fabric_core.topics`.

An agent's user JWT is a bearer token (MQTT cannot sign a server nonce) for MQTT connections only,
allowed to subscribe to its group's config subjects and its own cmd subject and to publish only its
own state subject; it expires after `nats_credentials_ttl_s` and is renewed through the heartbeat.
Its subject is the agent's derived user key (`NatsKeys.agent_user`): revoking that key in the
account JWT revokes every JWT the agent holds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from broker_bridge.nats import jwt
from broker_bridge.nats.keys import NatsKeys
from fabric_core.topics import all_subjects, cmd_topic, group_config_subjects, nats_subject, state_topic

ACCOUNT_NAME = "policycast"
SYSTEM_ACCOUNT_NAME = "SYS"
MQTT_INTERNAL_DELIVERY = "$MQTT.sub.>"
"""Where NATS delivers a QoS 1 (JetStream-backed) MQTT subscription: a subscriber at QoS 1 needs it."""


def operator_jwt(keys: NatsKeys) -> str:
    claims = jwt.operator_claims(system_account=keys.system_account.public_key)
    return jwt.encode(keys.operator, subject=keys.operator.public_key, name="policycast", nats=claims)


def system_account_jwt(keys: NatsKeys) -> str:
    return jwt.encode(
        keys.operator,
        subject=keys.system_account.public_key,
        name=SYSTEM_ACCOUNT_NAME,
        nats=jwt.account_claims(jetstream=False),
    )


def account_jwt(
    keys: NatsKeys, *, revocations: Mapping[str, int] | None = None, issued_at: int | None = None
) -> str:
    """Policycast's account, JetStream on, with `revocations` (user public key -> unix time)."""
    return jwt.encode(
        keys.operator,
        subject=keys.account.public_key,
        name=ACCOUNT_NAME,
        nats=jwt.account_claims(jetstream=True, revocations=revocations),
        issued_at=issued_at,
    )


def system_user_jwt(keys: NatsKeys) -> str:
    """The system account's user (not a bearer token: it signs the server's nonce)."""
    claims = jwt.user_claims(publish=None, subscribe=None, bearer=False)
    return jwt.encode(
        keys.system_account, subject=keys.system_user.public_key, name="policycast-sys", nats=claims
    )


def agent_permissions(prefix: str, agent_id: str, group_id: int | str) -> tuple[list[str], list[str]]:
    """(publish, subscribe) allow-lists of an agent, as NATS subjects."""
    publish = [nats_subject(state_topic(prefix, agent_id))]
    subscribe = [group_config_subjects(prefix, group_id), nats_subject(cmd_topic(prefix, agent_id))]
    return publish, subscribe


def agent_jwt(keys: NatsKeys, *, prefix: str, agent_id: str, group_id: int | str, expires: int) -> str:
    """An agent's bearer user JWT for MQTT, valid until `expires` (unix time)."""
    publish, subscribe = agent_permissions(prefix, agent_id, group_id)
    claims = jwt.user_claims(publish=publish, subscribe=subscribe, bearer=True, connection_types=["MQTT"])
    user = keys.agent_user(agent_id)
    return jwt.encode(keys.account, subject=user.public_key, name=agent_id, nats=claims, expires=expires)


def bridge_jwt(keys: NatsKeys, *, prefix: str) -> str:
    """The bridge's bearer user JWT for MQTT: everything under the prefix, and its QoS 1 state
    subscription's delivery subject. It does not expire (revoke the bridge's key to end it)."""
    everything = all_subjects(prefix)
    claims = jwt.user_claims(
        publish=[everything],
        subscribe=[everything, MQTT_INTERNAL_DELIVERY],
        bearer=True,
        connection_types=["MQTT"],
    )
    return jwt.encode(
        keys.account, subject=keys.bridge_user().public_key, name="policycast-bridge", nats=claims
    )


def expiry(ttl_s: int, *, now: float | None = None) -> int:
    return int(now if now is not None else time.time()) + ttl_s
