"""The agent's broker account as its link uses it: where (every node), as whom, how, and until when.

The identity's `MqttCredentials` (from enrolment, renewed by the manager: `AgentCore.adopt_credentials`)
become a link's `LinkOptions` here (`link_options`): every broker URL (the link picks one per connect),
the MQTT version and session the broker engine asks for (`delivery`), the CAs the identity trusts. Also
whether push mode can run at all (`push_blocker`) and whether the password has expired (`expired`).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

from agent_stub import trust
from agent_stub.core import AgentCore
from agent_stub.mqtt_link import LinkOptions, Message
from agent_stub.state import Identity, credentials_problem
from fabric_core.settings import AgentSettings, MqttAddress
from fabric_core.topics import DEFAULT_PREFIX
from fabric_core.wire import MqttCredentials, MqttDelivery

NOT_AUTHORISED = frozenset({0x86, 0x87})
"""CONNACK reasons that say the credentials are not (or no longer) good: bad user name or password, not
authorised (MQTT 3.1.1 return codes 4 and 5, as paho maps them)."""


def topic_prefix(identity: Identity) -> str:
    """The topic prefix of the agent's broker, as enrolment gave it (or set by hand), else the default."""
    credentials = identity.mqtt
    if credentials is None:
        return DEFAULT_PREFIX
    return credentials.prefix or credentials.mqtt_prefix or DEFAULT_PREFIX


def push_blocker(core: AgentCore) -> str | None:
    """Why push mode cannot run now, or None when it can."""
    if core.mode != "push":
        return "the document says pull" if core.document else "no document yet"
    credentials = core.identity.mqtt
    if credentials is None:
        return "no broker credentials (the manager offered no push at enrolment)"
    problem = credentials_problem(credentials)
    return None if problem is None else f"unusable broker settings: {problem}"


def expired(credentials: MqttCredentials | None, *, now: datetime | None = None) -> bool:
    """Whether the password of `credentials` has expired by the agent's clock (never, without expiry)."""
    if credentials is None or credentials.expires_at is None:
        return False
    expires_at = credentials.expires_at
    if expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    return expires_at <= (now or datetime.now(UTC))


def delivery_of(identity: Identity) -> MqttDelivery:
    """How the agent's broker engine delivers: the identity's, else (no credentials) the default."""
    return identity.mqtt.delivery if identity.mqtt is not None else MqttDelivery()


def link_options(
    identity: Identity,
    settings: AgentSettings,
    *,
    will: Message | None = None,
    rng: random.Random | None = None,
) -> LinkOptions:
    """The options of the agent's MQTT session: its broker account, and the session its engine asks for.

    A persistent session (the default) starts without clean start and outlives a disconnection by
    `mqtt_session_expiry_s`; a clean one (`persistent_session` false) starts clean and ends with the
    connection (session expiry 0). The MQTT version is the engine's (`delivery.protocol`); the link
    picks one of the broker URLs for each connect with `rng`. Over mqtts:// the link trusts the
    identity's CAs only (none held: the system store, as before agents pinned a CA), on every node.
    """
    credentials = identity.mqtt
    if credentials is None:  # pragma: no cover - callers check it (`push_blocker`)
        raise RuntimeError("push mode without broker credentials")
    persistent = credentials.delivery.persistent_session
    nodes = tuple(dict.fromkeys(MqttAddress.parse(url) for url in credentials.broker_urls))
    return LinkOptions(
        address=nodes[0],
        addresses=nodes if len(nodes) > 1 else (),
        protocol=credentials.delivery.protocol,
        rng=rng,
        client_id=identity.agent_id,
        username=credentials.username,
        password=credentials.password,
        keepalive_s=settings.mqtt_keepalive_s,
        session_expiry_s=settings.mqtt_session_expiry_s if persistent else 0,
        clean_start=not persistent,
        will=will,
        timeout_s=settings.request_timeout_s,
        ssl_context=trust.context_for(identity.trusted_cas),
    )
