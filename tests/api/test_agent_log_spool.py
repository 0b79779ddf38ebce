"""The agent's log spool against the real manager in-process: every uploaded batch is stored exactly once.

The agent side is the real one (`LogSpool` on disk, `PullLoop`, `ManagerClient`); its HTTP requests go
to the in-process manager through a transport that can lose an answer after the manager handled the
request, as a dropped connection or a timeout would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient

from agent_stub.core import AgentCore
from agent_stub.log_spool import LogSpool
from agent_stub.manager_client import ManagerClient
from agent_stub.pull import PullLoop
from agent_stub.runtime import AgentRuntime
from agent_stub.state import Identity, MemoryStateStore
from api.main import create_app
from fabric_core.settings import AgentSettings, Settings
from fabric_core.wire import SigningKeyInfo
from tests.support.clients import Admin, AgentClient
from tests.support.waiting import wait_for_async

SERVER = "http://testserver"  # TestClient's base URL


class ThroughTestClient(httpx.AsyncBaseTransport):
    """Hands the agent's requests to the in-process manager; `lose_answers` drops that many answers."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.lose_answers = 0
        self.batch_ids: list[str] = []
        """The log batch id of each heartbeat that carried one, in order."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        logs = orjson.loads(body).get("logs") if body else None
        if logs is not None:
            self.batch_ids.append(logs["batch_id"])
        answer = self.client.request(request.method, str(request.url), content=body, headers=request.headers)
        if self.lose_answers:
            self.lose_answers -= 1
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)


class Agent:
    """One enrolled agent, as `policycast-agent run` would build it, over the transport above."""

    def __init__(self, enrolled: AgentClient, transport: ThroughTestClient, state_dir: Path) -> None:
        enrolment = enrolled.enrolment
        self.id = enrolled.id
        self.identity = Identity(
            agent_id=enrolled.id,
            secret=enrolment["secret"],
            server=SERVER,
            group_id=enrolled.group_id,
            signing_key=SigningKeyInfo.model_validate(enrolment["signing_key"]),
            hostname="host-1",
        )
        self.transport = transport
        self.settings = AgentSettings(state_dir=state_dir, retry_min_s=0.01, retry_max_s=0.05)
        self.spool_dir = state_dir / "spool"

    def client(self) -> ManagerClient:
        http = httpx.AsyncClient(transport=self.transport)
        return ManagerClient(server=SERVER, agent_id=self.id, secret=self.identity.secret, http=http)

    def start(self) -> tuple[PullLoop, LogSpool]:
        """A fresh agent process: new core, new client, the spool read back from disk."""
        core = AgentCore(identity=self.identity, store=MemoryStateStore(self.identity))
        pull = PullLoop(core, self.client(), self.settings)
        spool = LogSpool(self.spool_dir, batch_size=500)
        pull.uploads = spool
        return pull, spool


def all_logs(admin: Admin, agent_id: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    while page := admin.get(f"/agents/{agent_id}/logs", params={"limit": 1000, "offset": len(records)}):
        records += page
    return records


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def test_a_lost_answer_and_a_crash_still_store_each_batch_once(
    admin: Admin, enroll: Callable[..., AgentClient], client: TestClient, tmp_path: Path
) -> None:
    agent = Agent(enroll(), ThroughTestClient(client), tmp_path)
    pull, spool = agent.start()
    for n in range(3):
        spool.append("info", f"m{n}")
    spool.append("security", "threat found", category="antivirus", data={"file": "/tmp/x"})

    agent.transport.lose_answers = 1
    run(pull.heartbeat_once)  # the manager stores the batch; the agent never hears so
    assert pull.heartbeats == 0
    stored = all_logs(admin, agent.id)
    assert len(stored) == 4

    # The agent dies and starts again over the same state directory.
    pull, spool = agent.start()
    spool.append("info", "after the restart")
    run(pull.heartbeat_once)

    first, resent = agent.transport.batch_ids
    assert resent == first  # the same batch, under the same id...
    assert all_logs(admin, agent.id) == stored  # ...stored once
    assert {record["batch_id"] for record in stored} == {first}
    threat = next(record for record in stored if record["level"] == "security")
    assert (threat["category"], threat["data"]) == ("antivirus", {"file": "/tmp/x"})

    run(pull.heartbeat_once)
    assert len(all_logs(admin, agent.id)) == 5
    assert spool.count() == 0


@pytest.fixture
def small_batches_client(settings: Settings) -> Iterator[TestClient]:
    """A manager that takes at most 100 entries per batch (`max_log_entries`)."""
    with TestClient(create_app(settings.model_copy(update={"max_log_entries": 100}))) as test_client:
        yield test_client


def test_a_backlog_gets_through_a_manager_with_a_lower_batch_limit(
    small_batches_client: TestClient, tmp_path: Path
) -> None:
    admin = Admin(small_batches_client)
    enrolled = admin.enroll()
    agent = Agent(enrolled, ThroughTestClient(small_batches_client), tmp_path)
    pull, spool = agent.start()
    for n in range(1200):
        spool.append("info", f"m{n}")

    async def drain() -> None:
        for _ in range(40):
            if spool.count() == 0:
                return
            await pull.heartbeat_once()  # 413 for 500 entries: the spool splits until the manager agrees

    run(drain)

    messages = [record["message"] for record in all_logs(admin, agent.id)]
    assert sorted(messages, key=lambda m: int(m[1:])) == [f"m{n}" for n in range(1200)]


def test_a_security_entry_reaches_the_manager_before_the_next_heartbeat_is_due(
    admin: Admin, enroll: Callable[..., AgentClient], client: TestClient, tmp_path: Path
) -> None:
    agent = Agent(enroll(), ThroughTestClient(client), tmp_path)
    core = AgentCore(identity=agent.identity, store=MemoryStateStore(agent.identity))
    spool = LogSpool(agent.spool_dir)
    runtime = AgentRuntime(core, agent.client(), agent.settings, spool=spool, priority_delay_s=0.05)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(runtime.run(stop))
        try:
            # Serial applied, then reported at once; the next heartbeat is due in 300 s (the default).
            await wait_for_async(
                lambda: runtime.pull.heartbeats == 2, timeout=10, what="the applied serial reported"
            )
            spool.append("security", "threat found", category="antivirus")
            await wait_for_async(
                lambda: runtime.pull.heartbeats == 3, timeout=10, what="a heartbeat carrying the entry"
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=5)

    run(scenario)

    records = all_logs(admin, agent.id)
    security = [(r["level"], r["category"], r["message"]) for r in records if r["level"] == "security"]
    assert security == [("security", "antivirus", "threat found")]
    assert any(r["category"] == "policy" and r["message"].startswith("applied serial") for r in records)
