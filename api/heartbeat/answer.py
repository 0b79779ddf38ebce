"""The heartbeat's answer: one function writes it, for the fast path and for the route alike.

Besides the document, the answer may carry new broker credentials (`mqtt`): only for a heartbeat that
reports when the agent's expire (`mqtt_expires_at`, NATS JWTs), and only when the broker engine says
they are due or no longer fit the document (`BrokerAccess.refreshed_credentials`). A heartbeat without
`mqtt_expires_at` (Mosquitto agents, pull-only agents) costs one comparison more than before.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from api.fabric import Fabric
from api.heartbeat.view import CachedDocument, KnownAgent
from fabric_core.wire import heartbeat_response_bytes

log = logging.getLogger(__name__)


def next_heartbeat_s(heartbeat_s: int, jitter: float) -> int:
    """The interval with +/- `jitter` spread, so that a fleet does not heartbeat in step."""
    if jitter <= 0:
        return heartbeat_s
    return max(1, round(heartbeat_s * random.uniform(1 - jitter, 1 + jitter)))


def answer_heartbeat(
    fabric: Fabric,
    agent: KnownAgent,
    *,
    secret_hash: str,
    serial: int,
    mode: str,
    status: dict[str, Any] | None,
    found: tuple[int, CachedDocument],
    mqtt_expires_at: int | None = None,
) -> bytes:
    """Record the heartbeat in the ledger and write the answer: the document when it changed.

    `found` is the (location, document) the agent gets. A pending "update now" answers "changed" once
    with the document the agent may already hold, so that it applies and reports it again.
    """
    location_id, document = found
    served_update = agent.update_requested
    changed = document.serial != serial or served_update
    if served_update:
        fabric.view.served_update(secret_hash)
    fabric.metrics.heartbeat_answered(changed=changed)
    fabric.ledger.record(
        agent.id,
        serial=serial,
        location_id=location_id,
        mode=mode,
        status=status,
        served_update=served_update,
    )
    return heartbeat_response_bytes(
        changed=changed,
        serial=document.serial,
        next_heartbeat_s=next_heartbeat_s(document.heartbeat_s, fabric.settings.heartbeat_jitter),
        envelope=document.envelope if changed else None,
        mqtt=None if mqtt_expires_at is None else _renewed(fabric, agent, mqtt_expires_at, changed),
    )


def _renewed(fabric: Fabric, agent: KnownAgent, expires_at: int, document_changed: bool) -> bytes | None:
    """The JSON of the agent's new broker credentials, if the engine has some for it now."""
    broker = fabric.broker
    if broker is None:
        return None
    try:
        credentials = broker.refreshed_credentials(
            agent.id, agent.group_id, expires_at=expires_at, document_changed=document_changed
        )
    except Exception:
        # The heartbeat is answered anyway: the agent reports its expiry again next time. Never the
        # credentials themselves in the log (a bearer JWT).
        log.exception("could not renew the broker credentials of agent %s", agent.id)
        return None
    return None if credentials is None else credentials.model_dump_json().encode()
