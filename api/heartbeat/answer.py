"""The heartbeat's answer: one function writes it, for the fast path and for the route alike."""

from __future__ import annotations

import random
from typing import Any

from api.fabric import Fabric
from api.heartbeat.view import CachedDocument, KnownAgent
from fabric_core.wire import heartbeat_response_bytes


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
    )
