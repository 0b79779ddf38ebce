"""The bridge's waits between failed rounds: a broker that comes back ends them (pure logic)."""

from __future__ import annotations

import threading
from typing import Any, cast

from sqlalchemy import create_engine

from broker_bridge.broker import BrokerLink
from broker_bridge.mosquitto.engine import MosquittoEngine
from broker_bridge.service import Bridge
from fabric_core.settings import Settings
from fabric_core.signing import SigningKey
from tests.support.waiting import wait_for


class WatchedEvent(threading.Event):
    """A `threading.Event` that tells how it has been waited on: `waits` lists each wait's timeout
    and outcome once it returned; `entered` holds the timeouts of the waits begun."""

    def __init__(self) -> None:
        super().__init__()
        self.entered: list[float | None] = []
        self.waits: list[tuple[float | None, bool]] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.entered.append(timeout)
        result = super().wait(timeout)
        self.waits.append((timeout, result))
        return result


class _Link:
    def __init__(self, *, up: bool) -> None:
        self.connected = WatchedEvent()
        if up:
            self.connected.set()


def _bridge(link: _Link, tmp_path: Any) -> Bridge:
    return Bridge(
        settings=Settings(data_dir=tmp_path),
        engine=create_engine("sqlite://"),
        broker=MosquittoEngine(Settings(data_dir=tmp_path), SigningKey.generate()),
        link=cast(BrokerLink, link),
    )


def _pause_in_thread(bridge: Bridge, delay: float, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=bridge._pause, args=(delay, stop), daemon=True)
    thread.start()
    return thread


def test_a_lost_broker_coming_back_ends_the_back_off_at_once(tmp_path: Any) -> None:
    link = _Link(up=False)
    pausing = _pause_in_thread(_bridge(link, tmp_path), 3600.0, threading.Event())
    # The broker is still away: the pause watches the link, and goes on watching when a watch runs out.
    wait_for(lambda: len(link.connected.entered) >= 2, timeout=10, what="a second watch of the link")
    assert pausing.is_alive()
    assert link.connected.waits[0] == (link.connected.entered[0], False)
    link.connected.set()
    pausing.join(timeout=30)
    assert not pausing.is_alive()  # not an hour: the documents waiting in the outbox go out now


def test_a_failure_with_the_broker_up_waits_out_its_back_off_unless_stopped(tmp_path: Any) -> None:
    link, stop = _Link(up=True), WatchedEvent()
    pausing = _pause_in_thread(_bridge(link, tmp_path), 3600.0, stop)
    # e.g. the database is away: a connected link is no reason to hurry; it waits the whole back-off.
    wait_for(lambda: stop.entered, timeout=10, what="the pause to wait on the stop event")
    assert stop.entered[0] is not None and stop.entered[0] > 3500
    assert pausing.is_alive()
    assert link.connected.entered == []  # the link is not what it waits for
    stop.set()
    pausing.join(timeout=30)
    assert not pausing.is_alive()
