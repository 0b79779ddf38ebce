"""The heartbeat ledger writes bookkeeping in batches: one bad row cannot stall the others, and a flush
that fails loses nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from api.heartbeat.ledger import HeartbeatLedger
from manager_db.models import Agent
from tests.support.clients import Admin, AgentClient


def test_one_unwritable_sighting_does_not_stall_the_batch(
    admin: Admin, enroll: Callable[..., AgentClient]
) -> None:
    good, bad = enroll(hostname="good"), enroll(hostname="bad")
    engine = admin.client.app.state.fabric.engine  # type: ignore[attr-defined]
    ledger = HeartbeatLedger()
    ledger.record(good.id, serial=7, location_id=1, mode="pull", status={}, served_update=False)
    # Beyond BIGINT: the API refuses such serials, but the ledger must survive one that slips through.
    ledger.record(bad.id, serial=2**70, location_id=1, mode="pull", status={}, served_update=False)

    written = ledger.flush(engine)

    assert written == 1
    assert len(ledger) == 0  # dropped, not retried forever
    with Session(engine) as session:
        assert session.get(Agent, good.id).serial == 7  # type: ignore[union-attr]
        assert session.get(Agent, bad.id).serial == 0  # type: ignore[union-attr]


def test_a_status_is_not_lost_when_a_flush_fails(client, enroll):
    """The database away at a flush: the sightings wait for the next one, and a later heartbeat
    without status does not drop the status of one that came before the outage."""
    agent = enroll()
    fabric = client.app.state.fabric
    ledger = HeartbeatLedger()
    status = {"hostname": "pc-1", "content": {"definitions": 3}}
    ledger.record(agent.id, serial=1, location_id=1, mode="pull", status=status, served_update=False)

    class Away:
        def begin(self) -> Any:
            raise OperationalError("UPDATE agents", {}, Exception("connection refused"))

    with pytest.raises(OperationalError):
        ledger.flush(Away())  # type: ignore[arg-type]
    ledger.record(agent.id, serial=2, location_id=1, mode="push", status=None, served_update=False)
    assert len(ledger) == 1

    assert ledger.flush(fabric.engine) == 1

    with Session(fabric.engine) as session:
        row = session.get(Agent, agent.id)
        assert row is not None
        assert (row.serial, row.mode, row.status) == (2, "push", status)
