"""Content downloads against the real manager in-process: delta, verification, resume, atomic switch.

The manager runs under FastAPI's TestClient (its lifespan, a real SQLite database, a real blob store);
the agent's `ManagerClient` reaches it through `httpx.ASGITransport`, behind a transport that records
every request (and can cut a download short), so tests count what went over the wire.
"""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient

from agent_stub.content import ContentSync, Outcome, SyncReport, _check_paths
from agent_stub.core import AgentCore
from agent_stub.errors import ContentRejected, ManagerBadResponse, ManagerRejected, ManagerUnreachable
from agent_stub.facts import HostFacts
from agent_stub.manager_client import ManagerClient
from agent_stub.runtime import AgentRuntime
from agent_stub.state import Identity, MemoryStateStore
from fabric_core.settings import AgentSettings, Settings
from fabric_core.wire import EffectiveDocument, EnrollResponse
from local_stack.composition import manager_app
from tests.agent_stub.conftest import WAIT_S
from tests.api.test_content import publish, sha
from tests.support.clients import ADMIN_KEY, Admin
from tests.support.waiting import wait_for_async

SERVER = "http://manager.test"
KIND = "definitions"
FILES = {"virus.db": b"signatures v1 " * 500, "rules/extra.db": b"rules v1 " * 300, "README": b"read me"}


# --- the manager, and a transport that sees every request --------------------------------------------


@pytest.fixture
def manager(tmp_path: Path, sqlite_template: Path) -> Iterator[TestClient]:
    """The manager on SQLite only: these tests are about the agent, not the database."""
    database = tmp_path / "data" / "policycast.db"
    database.parent.mkdir(parents=True)
    shutil.copy(sqlite_template, database)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{database}",
        bootstrap_admin_key=ADMIN_KEY,
        heartbeat_flush_s=0.2,
        cache_refresh_s=0.2,
    )
    with TestClient(manager_app(settings)) as client:
        yield client


@pytest.fixture
def admin(manager: TestClient) -> Admin:
    return Admin(manager)


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    status: int
    sent: bytes
    body: bytes


class _CutStream(httpx.AsyncByteStream):
    """A body that breaks off after `cut` bytes, as a dropped connection does."""

    def __init__(self, data: bytes, cut: int) -> None:
        self.data, self.cut = data, cut

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data[: self.cut]
        raise httpx.ReadError("connection dropped")


class Recorder(httpx.AsyncBaseTransport):
    """The app over ASGI; records each request, and cuts the next blob body after `cut_next` bytes."""

    def __init__(self, app: Any) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.seen: list[Seen] = []
        self.cut_next: int | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        path = request.url.path
        seen = Seen(
            request.method, path, request.headers.get("range"), response.status_code, request.content, body
        )
        self.seen.append(seen)
        if self.cut_next is not None and "/blobs/" in path:
            cut, self.cut_next = self.cut_next, None
            return httpx.Response(
                response.status_code, headers=response.headers, stream=_CutStream(body, cut)
            )
        return httpx.Response(response.status_code, headers=response.headers, content=body)

    def blobs(self) -> list[Seen]:
        return [s for s in self.seen if s.path.startswith("/agent/v1/blobs/")]

    def manifests(self) -> list[Seen]:
        return [s for s in self.seen if s.path.startswith("/agent/v1/content/")]


# --- one enrolled agent ------------------------------------------------------------------------------


class Agent:
    """An enrolled agent's identity and content store; `sync` runs one pass on a fresh event loop."""

    def __init__(self, admin: Admin, store_dir: Path) -> None:
        self.admin = admin
        self.root_id = admin.root()["id"]
        token = admin.post(f"/groups/{self.root_id}/enrollment-tokens", {})["token"]
        answer = admin.client.post("/agent/v1/enroll", json={"token": token, "hostname": "host-1"})
        assert answer.status_code == 200, answer.text
        enrolment = EnrollResponse.model_validate(answer.json())
        self.identity = Identity.from_enrollment(server=SERVER, response=enrolment, hostname="host-1")
        self.core = AgentCore(identity=self.identity, store=MemoryStateStore(self.identity))
        self.store_dir = store_dir
        self.transport = Recorder(admin.client.app)
        self.slept: list[float] = []

    def client(self) -> ManagerClient:
        return ManagerClient.for_agent(
            server=SERVER,
            agent_id=self.identity.agent_id,
            secret=self.identity.secret,
            timeout_s=5.0,
            transport=self.transport,
        )

    def content(self, client: ManagerClient, **options: Any) -> ContentSync:
        async def sleep(delay: float) -> None:  # a fake sleep: the delay asked is recorded, not slept
            self.slept.append(delay)

        options.setdefault("sleep", sleep)
        return ContentSync(self.core, client, self.store_dir, **options)

    def doc(self) -> EffectiveDocument:
        return EffectiveDocument.parse(self.admin.effective(self.root_id))

    def sync(self, doc: EffectiveDocument | None = None, **options: Any) -> SyncReport:
        wanted = doc if doc is not None else self.doc()

        async def main() -> SyncReport:
            async with self.client() as client:
                return await self.content(client, **options).sync(wanted)

        return asyncio.run(main())

    def held(self) -> dict[str, int]:
        return ContentSync(self.core, self.client(), self.store_dir).held()

    def tree(self) -> dict[str, bytes]:
        """The files readers see through `<kind>/current`."""
        current = self.store_dir / KIND / "current"
        return {p.relative_to(current).as_posix(): p.read_bytes() for p in current.rglob("*") if p.is_file()}

    def communication(self, **settings: Any) -> None:
        self.admin.put(f"/groups/{self.root_id}/communication", settings)


@pytest.fixture
def agent(admin: Admin, tmp_path: Path) -> Agent:
    return Agent(admin, tmp_path / "state" / "content")


def blob_on_manager(admin: Admin, data: bytes) -> Path:
    store = Path(admin.client.app.state.settings.blob_dir)  # type: ignore[attr-defined]
    return store / sha(data)[:2] / sha(data)


# --- the tests ---------------------------------------------------------------------------------------


def test_the_first_sync_downloads_every_file_verifies_it_and_switches(admin: Admin, agent: Agent) -> None:
    publish(admin, KIND, FILES)

    report = agent.sync()

    result = report.kinds[KIND]
    assert (result.outcome, result.revision, result.fetched, result.reused) == (Outcome.SWITCHED, 1, 3, 0)
    assert result.bytes_fetched == sum(len(data) for data in FILES.values())
    assert len(agent.transport.manifests()) == 1 and len(agent.transport.blobs()) == 3
    assert agent.tree() == FILES
    current = agent.store_dir / KIND / "current"
    assert current.is_symlink() and current.readlink() == Path("1")
    assert sorted(p.name for p in (agent.store_dir / "blobs").iterdir()) == sorted(map(sha, FILES.values()))
    assert list((agent.store_dir / "partial").iterdir()) == []

    again = agent.sync()  # nothing changed: not even the manifest is asked for
    assert again.kinds[KIND].outcome is Outcome.HELD and len(agent.transport.seen) == 4


def test_a_new_revision_fetches_only_the_blob_that_changed(admin: Admin, agent: Agent) -> None:
    publish(admin, KIND, FILES)
    agent.sync()
    changed = {**FILES, "virus.db": b"signatures v2 " * 500}
    publish(admin, KIND, changed)
    agent.transport.seen.clear()

    result = agent.sync().kinds[KIND]

    assert (result.outcome, result.revision, result.fetched, result.reused) == (Outcome.SWITCHED, 2, 1, 2)
    assert [s.path for s in agent.transport.blobs()] == [f"/agent/v1/blobs/{sha(changed['virus.db'])}"]
    assert agent.tree() == changed and agent.held() == {KIND: 2}

    # The previous tree stays for readers that resolved `current` just before the switch; the one
    # before it goes, with the blobs only it used.
    publish(admin, KIND, {**changed, "README": b"read me v3"})
    agent.sync()
    assert sorted(
        p.name for p in (agent.store_dir / KIND).iterdir() if p.is_dir() and not p.is_symlink()
    ) == [
        "2",
        "3",
    ]
    blobs = {p.name for p in (agent.store_dir / "blobs").iterdir()}
    assert sha(FILES["virus.db"]) not in blobs  # only revision 1 had it
    assert {sha(changed["virus.db"]), sha(b"read me"), sha(b"read me v3")} <= blobs


def test_a_corrupted_blob_is_retried_then_rejected_and_the_old_revision_stays(
    admin: Admin, agent: Agent
) -> None:
    publish(admin, KIND, FILES)
    agent.sync()
    new = b"signatures v2 " * 500
    publish(admin, KIND, {**FILES, "virus.db": new})
    tampered = blob_on_manager(admin, new)
    tampered.write_bytes(b"X" + new[1:])  # same size, one byte off
    agent.transport.seen.clear()

    result = agent.sync(max_attempts=3).kinds[KIND]

    assert result.outcome is Outcome.REJECTED and "failed verification" in (result.reason or "")
    assert [s.path for s in agent.transport.blobs()] == [f"/agent/v1/blobs/{sha(new)}"] * 3
    assert agent.held() == {KIND: 1} and agent.tree() == FILES
    assert not (agent.store_dir / "blobs" / sha(new)).exists()
    assert not (agent.store_dir / "partial" / sha(new)).exists()
    assert not (agent.store_dir / KIND / "2").exists()


def test_an_interrupted_download_resumes_with_a_range_request(admin: Admin, agent: Agent) -> None:
    big = bytes(range(256)) * 400
    publish(admin, KIND, {"big.db": big})
    agent.transport.cut_next = 30_000

    first = agent.sync().kinds[KIND]

    assert first.outcome is Outcome.FAILED  # transient: the scheduled task retries it
    assert (agent.store_dir / "partial" / sha(big)).read_bytes() == big[:30_000]
    assert agent.held() == {}

    second = agent.sync().kinds[KIND]

    assert second.outcome is Outcome.SWITCHED and agent.tree() == {"big.db": big}
    last = agent.transport.blobs()[-1]
    assert (last.range, last.status, len(last.body)) == ("bytes=30000-", 206, len(big) - 30_000)


def test_a_partial_file_left_on_disk_is_resumed(admin: Admin, agent: Agent) -> None:
    big = b"0123456789" * 5000
    publish(admin, KIND, {"big.db": big})
    partial = agent.store_dir / "partial" / sha(big)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(big[:12_345])

    result = agent.sync().kinds[KIND]

    assert result.outcome is Outcome.SWITCHED and result.bytes_fetched == len(big) - 12_345
    [request] = agent.transport.blobs()
    assert (request.range, request.status) == ("bytes=12345-", 206)
    assert agent.tree() == {"big.db": big} and not partial.exists()


def test_a_manifest_whose_digest_is_not_the_documents_is_rejected(admin: Admin, agent: Agent) -> None:
    publish(admin, KIND, FILES)
    agent.sync()
    publish(admin, KIND, {"virus.db": b"from an impostor"})
    doc = agent.doc()
    forged = doc.model_copy(
        update={"content": {KIND: doc.content[KIND].model_copy(update={"manifest_sha256": "0" * 64})}}
    )
    agent.transport.seen.clear()

    result = agent.sync(forged).kinds[KIND]

    assert result.outcome is Outcome.REJECTED and "hashes to" in (result.reason or "")
    assert agent.transport.blobs() == []  # nothing is downloaded on a manifest it cannot trust
    assert agent.held() == {KIND: 1} and agent.tree() == FILES


def test_with_downloads_disabled_nothing_is_fetched(admin: Admin, agent: Agent) -> None:
    agent.communication(download_enabled=False)
    publish(admin, KIND, FILES)

    result = agent.sync().kinds[KIND]

    assert result.outcome is Outcome.DISABLED
    assert agent.transport.seen == [] and agent.held() == {}


def test_the_download_waits_a_random_delay_drawn_within_the_window(admin: Admin, agent: Agent) -> None:
    agent.communication(randomize_s=600)
    publish(admin, KIND, FILES)
    windows: list[tuple[float, float]] = []
    requests_before_sleep: list[int] = []

    class Rng(random.Random):
        def uniform(self, a: float, b: float) -> float:
            windows.append((a, b))
            return super().uniform(a, b)

    async def sleep(delay: float) -> None:  # a fake sleep: it records when it was asked for
        requests_before_sleep.append(len(agent.transport.seen))
        agent.slept.append(delay)

    report = agent.sync(rng=Rng(7), sleep=sleep)

    assert windows == [(0, 600)]
    assert agent.slept == [report.delay_s] and 0 <= report.delay_s <= 600
    assert requests_before_sleep == [0]  # the wait comes before the first request
    assert report.kinds[KIND].outcome is Outcome.SWITCHED


def test_no_delay_when_there_is_nothing_to_download(admin: Admin, agent: Agent) -> None:
    agent.communication(randomize_s=600)
    publish(admin, KIND, FILES)
    agent.sync()
    agent.slept.clear()

    assert agent.sync().kinds[KIND].outcome is Outcome.HELD and agent.slept == []


def test_what_is_held_survives_a_restart(admin: Admin, agent: Agent) -> None:
    publish(admin, KIND, FILES)
    agent.sync()

    async def restarted() -> dict[str, Any]:
        async with agent.client() as client:
            return agent.content(client).status()

    assert asyncio.run(restarted()) == {"content": {KIND: 1}}
    agent.transport.seen.clear()
    assert agent.sync().kinds[KIND].outcome is Outcome.HELD and agent.transport.seen == []


def test_a_newer_document_supersedes_a_sync_in_progress(admin: Admin, agent: Agent) -> None:
    agent.communication(randomize_s=60)
    publish(admin, KIND, FILES)
    first = agent.doc()
    publish(admin, KIND, {**FILES, "README": b"read me v2"})
    second = agent.doc()
    policy_only = second.model_copy(update={"serial": second.serial + 1})

    async def scenario() -> ContentSync:
        gate = asyncio.Event()

        async def sleep(delay: float) -> None:  # a fake sleep: the first one lasts until superseded
            agent.slept.append(delay)
            if len(agent.slept) == 1:
                await gate.wait()  # the first pass waits out its window until superseded

        async with agent.client() as client:
            content = agent.content(client, sleep=sleep, rng=random.Random(3))
            content.schedule(first)
            await wait_for_async(lambda: len(agent.slept) == 1, timeout=WAIT_S, what="len(agent.slept) == 1")
            content.schedule(second)
            content.schedule(policy_only)  # same content as `second`: that pass goes on
            await asyncio.wait_for(content.wait(), timeout=10)
            return content

    content = asyncio.run(scenario())

    assert content.held() == {KIND: 2} and len(agent.slept) == 2
    assert [s.path for s in agent.transport.manifests()] == [f"/agent/v1/content/{KIND}/2"]


def test_the_runtime_downloads_content_and_reports_it_in_heartbeats(
    admin: Admin, agent: Agent, settings: AgentSettings
) -> None:
    agent.communication(mode="pull", heartbeat_s=3600)
    publish(admin, KIND, FILES)
    assert agent.store_dir == settings.state_dir / "content"  # where the runtime keeps content

    def reported() -> list[Any]:
        """The `content` status of each heartbeat sent so far that carried a status (only changes do)."""
        beats = [orjson.loads(s.sent) for s in agent.transport.seen if s.path == "/agent/v1/heartbeat"]
        return [beat["status"].get("content") for beat in beats if "status" in beat]

    async def scenario() -> None:
        async with agent.client() as client:
            runtime = AgentRuntime(agent.core, client, settings, rng=random.Random(1), read_facts=HostFacts)
            content = runtime.content
            assert content is not None
            stop = asyncio.Event()
            task = asyncio.create_task(runtime.run(stop))
            try:
                await wait_for_async(
                    lambda: content.held() == {KIND: 1}, timeout=10, what="content.held() == {KIND: 1}"
                )
                runtime.update_now()
                await wait_for_async(
                    lambda: reported()[-1] == {KIND: 1}, timeout=10, what="reported()[-1] == {KIND: 1}"
                )
            finally:
                stop.set()
                await asyncio.wait_for(task, timeout=5)

    asyncio.run(scenario())
    assert reported()[0] == {}  # the first heartbeat, before the document named any content
    assert agent.tree() == FILES


def test_manifest_etag_gives_304(admin: Admin, agent: Agent) -> None:
    revision = publish(admin, KIND, FILES)

    async def fetch() -> tuple[Any, Any, Any]:
        async with agent.client() as client:
            manifest, etag = await client.get_manifest(KIND, 1)
            again, same = await client.get_manifest(KIND, 1, etag=etag)
            return manifest, etag, (again, same)

    manifest, etag, (again, same) = asyncio.run(fetch())
    assert manifest.digest() == revision["manifest_sha256"] and etag == f'"{revision["manifest_sha256"]}"'
    assert again is None and same == etag


def test_a_stored_blob_damaged_on_disk_is_fetched_again(admin: Admin, agent: Agent) -> None:
    publish(admin, KIND, FILES)
    agent.sync()
    damaged = agent.store_dir / KIND / "current" / "README"  # a hard link to the blob: same bytes
    damaged.chmod(0o644)
    damaged.write_bytes(b"edited in place")
    publish(admin, KIND, {**FILES, "virus.db": b"signatures v2"})
    agent.transport.seen.clear()

    result = agent.sync().kinds[KIND]

    assert (result.outcome, result.fetched, result.reused) == (Outcome.SWITCHED, 2, 1)
    assert agent.tree() == {**FILES, "virus.db": b"signatures v2"}


@pytest.mark.parametrize(
    "paths",
    [
        ["../escape"],
        ["a/../../b"],
        ["/abs"],
        ["a//b"],
        ["./a"],
        ["a/./b"],
        ["a/"],
        ["a\\b"],
        ["a\x00b"],
        ["a\nb"],
        ["a", "a"],
        ["a", "a/b"],
        ["a/b", "a"],
    ],
)
def test_manifest_paths_that_could_escape_or_clash_are_refused(paths: list[str]) -> None:
    with pytest.raises(ContentRejected):
        _check_paths(paths)


# --- ManagerClient.download_blob against canned answers ----------------------------------------------


def _download(tmp_path: Path, answer: httpx.Response, *, offset: int = 0) -> tuple[bytes, httpx.Request]:
    target = tmp_path / "blob"
    target.write_bytes(b"x" * offset)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer

    async def main() -> None:
        client = ManagerClient.for_agent(
            server=SERVER, agent_id="a", secret="s", timeout_s=1.0, transport=httpx.MockTransport(handler)
        )
        async with client:
            await client.download_blob("ab" * 32, target, offset=offset)

    asyncio.run(main())
    return target.read_bytes(), seen[0]


def test_a_200_to_a_range_request_starts_over(tmp_path: Path) -> None:
    data, request = _download(tmp_path, httpx.Response(200, content=b"whole"), offset=3)
    assert data == b"whole" and request.headers["range"] == "bytes=3-"
    assert request.headers["authorization"] == "Bearer s"


def test_a_206_appends_only_if_it_starts_where_asked(tmp_path: Path) -> None:
    good = httpx.Response(206, content=b"tail", headers={"Content-Range": "bytes 3-6/7"})
    assert _download(tmp_path, good, offset=3)[0] == b"xxxtail"
    wrong = httpx.Response(206, content=b"tail", headers={"Content-Range": "bytes 0-3/7"})
    with pytest.raises(ManagerBadResponse):
        _download(tmp_path, wrong, offset=3)


@pytest.mark.parametrize(
    ("status", "error"), [(404, ManagerRejected), (401, ManagerRejected), (503, ManagerUnreachable)]
)
def test_download_errors_map_to_the_client_hierarchy(
    tmp_path: Path, status: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        _download(tmp_path, httpx.Response(status, json={"detail": "no"}))
