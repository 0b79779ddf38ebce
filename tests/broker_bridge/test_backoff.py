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


class _Link:
    def __init__(self, *, up: bool) -> None:
        self.connected = threading.Event()
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
    pausing.join(timeout=0.3)
    assert pausing.is_alive()  # the broker is still away: it waits
    link.connected.set()
    pausing.join(timeout=30)
    assert not pausing.is_alive()  # not an hour: the documents waiting in the outbox go out now


def test_a_failure_with_the_broker_up_waits_out_its_back_off_unless_stopped(tmp_path: Any) -> None:
    link, stop = _Link(up=True), threading.Event()
    pausing = _pause_in_thread(_bridge(link, tmp_path), 3600.0, stop)
    pausing.join(timeout=0.3)
    assert pausing.is_alive()  # e.g. the database is away: a connected link is no reason to hurry
    stop.set()
    pausing.join(timeout=30)
    assert not pausing.is_alive()
