"""The simulator's heartbeat counters: what the benchmarks read to know the fleet is quiet."""

from __future__ import annotations

import asyncio

import pytest

from agent_stub.errors import ManagerUnreachable
from agent_stub.simulator.stats import CountingClient, FleetStats
from fabric_core.wire import HeartbeatRequest, HeartbeatResponse
from tests.agent_stub.conftest import WAIT_S
from tests.support.waiting import wait_for_async

REQUEST = HeartbeatRequest(serial=3, mode="pull")
ANSWER = HeartbeatResponse(changed=False, serial=3, next_heartbeat_s=300)


class HeldManager:
    """Answers (or fails) every heartbeat only when told to."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.failure: Exception | None = None

    async def heartbeat(self, request: HeartbeatRequest) -> HeartbeatResponse:
        await self.release.wait()
        if self.failure is not None:
            raise self.failure
        return ANSWER


@pytest.mark.parametrize("failure", [None, ManagerUnreachable("refused")], ids=["answered", "failed"])
def test_a_heartbeat_is_pending_from_its_request_until_it_ends(failure: Exception | None) -> None:
    stats = FleetStats()

    async def scenario() -> None:
        manager = HeldManager()
        manager.failure = failure
        client = CountingClient(manager, stats, asyncio.Semaphore(1))  # type: ignore[arg-type]
        beats = [asyncio.create_task(client.heartbeat(REQUEST)) for _ in range(2)]
        # One on the pool's only connection, one waiting for it: both count, only the first has left.
        await wait_for_async(lambda: stats.heartbeats_pending == 2, timeout=WAIT_S, what="two pending")
        assert stats.rates()["heartbeats"] == 1
        manager.release.set()
        await asyncio.gather(*beats, return_exceptions=True)

    asyncio.run(scenario())

    rates = stats.rates()
    assert rates["heartbeats_pending"] == 0
    assert rates["heartbeats"] == rates["pull_heartbeats"] == 2
    assert rates["heartbeat_failures"] == (2 if failure else 0)
