"""`FabricView` keeps the agent cache right when a cache miss, a served update and a refresh interleave.

The interleavings are made deterministic: a view whose cache miss stops between reading the agent row
and storing it, until the test lets it go on.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Connection

from api.heartbeat.view import FabricView, KnownAgent
from api.security import hash_secret
from fabric_core.settings import Settings
from manager_db.database import make_engine


class PausingView(FabricView):
    """A view whose first cache miss waits, after reading the agent's row, until `go_on` is set."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(make_engine(settings.resolved_database_url))
        self.row_read = threading.Event()
        self.go_on = threading.Event()
        self._paused = False

    def _read_agent(self, connection: Connection, secret_hash: str) -> KnownAgent | None:
        agent = super()._read_agent(connection, secret_hash)
        if not self._paused:
            self._paused = True
            self.row_read.set()
            assert self.go_on.wait(10), "the test never let the cache miss go on"
        return agent


def _secret_hash(agent: Any) -> str:
    return hash_secret(agent.enrolment["secret"])


def test_a_cache_miss_that_races_a_revocation_leaves_the_agent_revoked(settings, enroll, admin):
    agent = enroll()
    view = PausingView(settings)
    view.refresh()
    with ThreadPoolExecutor(1) as pool:
        miss = pool.submit(view.load_agent, _secret_hash(agent))
        assert view.row_read.wait(10)  # the miss holds the agent's row from before the revocation
        admin.delete(f"/agents/{agent.id}")
        assert view.refresh()  # the revocation's refresh, while the agent is not in the cache yet
        view.go_on.set()
        answered = miss.result(10)

    assert answered is not None and answered.revoked
    cached = view.cached_agent(_secret_hash(agent))
    assert cached is not None and cached.revoked
    assert not view.refresh()  # nothing left to learn: the cache already holds the revocation


def test_a_cache_miss_without_a_race_caches_the_agent(settings, enroll):
    agent = enroll()
    view = PausingView(settings)
    view.refresh()
    view.go_on.set()

    loaded = view.load_agent(_secret_hash(agent))

    assert loaded is not None and not loaded.revoked
    assert view.cached_agent(_secret_hash(agent)) == loaded


def test_a_revocation_reaches_an_agent_the_view_already_knows(settings, enroll, admin):
    agent = enroll()
    view = PausingView(settings)
    view.refresh()
    view.go_on.set()
    assert view.load_agent(_secret_hash(agent)) is not None

    admin.delete(f"/agents/{agent.id}")
    assert view.refresh()

    cached = view.cached_agent(_secret_hash(agent))
    assert cached is not None and cached.revoked


def test_serving_an_update_keeps_a_revocation_the_refresh_brought(settings, enroll, admin):
    agent = enroll()
    view = PausingView(settings)
    view.refresh()
    view.go_on.set()
    admin.post(f"/agents/{agent.id}/update-now", {}, expect=202)
    loaded = view.load_agent(_secret_hash(agent))
    assert loaded is not None and loaded.update_requested

    admin.delete(f"/agents/{agent.id}")
    assert view.refresh()
    view.served_update(_secret_hash(agent))  # the answer to a heartbeat read before the revocation

    cached = view.cached_agent(_secret_hash(agent))
    assert cached is not None and cached.revoked and not cached.update_requested
