"""The simulator's connect pacer: slots `1/rate` apart, and no burst after a stall of the loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent_stub.simulator.agents import WINDOW_S, Pacer


def test_slots_are_handed_out_in_turn_one_interval_apart() -> None:
    pacer = Pacer(100.0)
    assert [round(pacer.delay(10.0), 6) for _ in range(4)] == [0.0, 0.01, 0.02, 0.03]
    assert pacer.delay(20.0) == 0.0  # an idle pacer owes nothing: the next slot is now
    with pytest.raises(ValueError):
        Pacer(0)


def test_a_window_lets_go_at_most_twice_the_rate() -> None:
    pacer = Pacer(100.0)  # 10 per window at the rate: 20 at most
    assert pacer.per_window == 20
    assert [pacer.admit(5.0) for _ in range(21)] == [True] * 20 + [False]
    assert pacer.admit(5.0 + WINDOW_S * 1.01)  # the next window has room again


def _stall(seconds: float) -> None:
    """Keep the loop busy for `seconds`, as a fleet verifying a document at once does."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


async def _starts(pacer: Pacer, waiters: int, stall_s: float) -> list[float]:
    """When each of `waiters` (queued at once) started, the loop stalled for `stall_s` meanwhile."""
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def connect() -> None:
        await pacer.wait()
        starts.append(loop.time())

    tasks = [asyncio.create_task(connect()) for _ in range(waiters)]
    await asyncio.sleep(0)  # every waiter holds its slot
    _stall(stall_s)  # the slots pass meanwhile
    await asyncio.gather(*tasks)
    return starts


def test_after_a_stall_of_the_loop_the_waiters_do_not_all_start_at_once() -> None:
    pacer = Pacer(50.0)  # slots 20 ms apart, 10 per window at most
    starts = asyncio.run(_starts(pacer, 30, stall_s=0.7))  # every slot passed during the stall
    assert len(starts) == 30 and pacer.reslotted >= 20
    first = starts[0]
    assert sum(1 for at in starts if at - first < WINDOW_S / 2) <= pacer.per_window
    assert starts[-1] - first >= 15 * pacer.interval  # the others went in turn, one slot apart


def test_without_a_stall_every_waiter_keeps_its_slot() -> None:
    pacer = Pacer(200.0)
    starts = asyncio.run(_starts(pacer, 10, stall_s=0.0))
    assert len(starts) == 10 and pacer.reslotted == 0
