"""The heartbeat ledger writes bookkeeping in batches, and one bad row cannot stall the others."""

from __future__ import annotations

from sqlmodel import Session

from api.heartbeat.ledger import HeartbeatLedger
from manager_db.models import Agent
from tests.support.clients import Admin


def test_one_unwritable_sighting_does_not_stall_the_batch(admin: Admin, enroll: object) -> None:
    good, bad = enroll(hostname="good"), enroll(hostname="bad")  # type: ignore[operator]
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
