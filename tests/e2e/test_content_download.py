"""End to end: a real `policycast-agent run` downloads published content from a real manager over HTTP.

The agent switches `content/<kind>/current` to each new revision, fetching only the files that changed,
and reports what it holds in its heartbeats, so that the manager's retention keeps that revision.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_pull_agent import HEARTBEAT_S, SLACK_S
from tests.support.processes import Manager, enrolled_agent
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e
KIND = "definitions"


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    """Pull mode, short heartbeats, and a retention of one revision (plus those agents hold)."""
    manager = Manager(
        tmp_path / "manager",
        tmp_path,
        admin_key="pck_e2e-admin",
        heartbeat_flush_s="0.5",
        cache_refresh_s="0.5",
        content_retention="1",
    ).start()
    manager.admin.communication(manager.root(), mode="pull", heartbeat_s=HEARTBEAT_S)
    yield manager
    manager.stop()


def tree(state_dir: Path) -> dict[str, bytes] | None:
    """The files of the revision in force, or None before the first switch."""
    current = state_dir / "content" / KIND / "current"
    if not current.is_dir():
        return None
    return {p.relative_to(current).as_posix(): p.read_bytes() for p in current.rglob("*") if p.is_file()}


def reported_content(manager: Manager, agent_id: str) -> Any:
    """What the manager stored of the agent's `status.content` (its heartbeats, flushed in batches)."""
    stored = manager.agent_row(agent_id)["status"]
    return (json.loads(stored) if stored else {}).get("content")


def test_a_pull_agent_downloads_each_revision_and_the_manager_keeps_what_it_holds(
    manager: Manager, tmp_path: Path
) -> None:
    first = {"virus.db": b"signatures 1 " * 2000, "engine/rules.db": b"rules 1 " * 1000}
    manager.admin.publish_content(KIND, first)
    agent = enrolled_agent(manager, tmp_path, "agent-content")
    state_dir = agent.state_dir
    interval = HEARTBEAT_S * 2 + SLACK_S
    agent.start()
    try:
        wait_for(
            lambda: tree(state_dir) == first, timeout=10, what=lambda: f"revision 1 on disk\n{agent.output()}"
        )
        wait_for(
            lambda: reported_content(manager, agent.agent_id) == {KIND: 1},
            timeout=interval,
            what=lambda: f"the agent reporting revision 1\n{agent.output()}",
        )

        second = {**first, "virus.db": b"signatures 2 " * 2000}
        manager.admin.publish_content(KIND, second)
        # Retention is one revision, but the agent still held 1 when 2 was published.
        assert [r["revision"] for r in manager.admin.get(f"/content/{KIND}/revisions")] == [2, 1]

        wait_for(
            lambda: tree(state_dir) == second, timeout=interval, what=lambda: f"revision 2\n{agent.output()}"
        )
        assert (state_dir / "content" / KIND / "current").readlink() == Path("2")
        assert "1 blob(s) reused, 1 fetched" in agent.output()
    finally:
        assert agent.stop() == 0, agent.output()
