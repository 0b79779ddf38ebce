"""PullLoop against a fake manager (httpx.MockTransport): timing, applying, back-off, update now."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
import orjson
import pytest

from agent_stub import AGENT_VERSION
from agent_stub.core import AgentCore
from agent_stub.manager_client import ManagerClient
from agent_stub.pull import PullLoop
from agent_stub.state import FileStateStore
from fabric_core.settings import AgentSettings
from fabric_core.signing import SigningKey
from fabric_core.wire import HeartbeatRequest, HeartbeatResponse
from tests.agent_stub.conftest import LOCATION_ID, WAIT_S, make_doc
from tests.support.waiting import wait_for_async


class FakeManager:
    """Answers heartbeats like the manager: the current envelope when the agent's serial is behind."""

    def __init__(self, key: SigningKey, *, serial: int = 5, next_heartbeat_s: int = 60) -> None:
        self.envelope = key.sign_envelope(make_doc(serial=serial))
        self.serial = serial
        self.next_heartbeat_s = next_heartbeat_s
        self.failures: list[Exception | int] = []
        """Consumed one per heartbeat before answering normally: an exception raised or a status."""
        self.requests: list[dict[str, Any]] = []
        self.times: list[float] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/agent/v1/heartbeat"
        self.times.append(time.monotonic())
        self.requests.append(orjson.loads(request.content))
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return httpx.Response(failure, json={"detail": "agent revoked"})
        changed = self.requests[-1]["serial"] < self.serial
        body: dict[str, Any] = {
            "changed": changed,
            "serial": self.serial,
            "next_heartbeat_s": self.next_heartbeat_s,
        }
        if changed:
            body["config"] = orjson.loads(self.envelope)
        return httpx.Response(200, json=body)


class MaxRandom(random.Random):
    """Always picks the top of the jitter range, to observe the back-off ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _loop(
    core: AgentCore, manager: FakeManager, settings: AgentSettings, **kwargs: Any
) -> tuple[PullLoop, ManagerClient]:
    client = ManagerClient.for_agent(
        server="http://manager.test",
        agent_id="agent-1",
        secret="s3cret",
        timeout_s=1.0,
        transport=httpx.MockTransport(manager.handle),
    )
    return PullLoop(core, client, settings, **kwargs), client


def _run(
    core: AgentCore,
    manager: FakeManager,
    settings: AgentSettings,
    scenario: Callable[[PullLoop], Awaitable[None]],
) -> float:
    """Run the loop while `scenario` drives it, stop it, and return how long stopping took."""

    async def main() -> float:
        loop, client = _loop(core, manager, settings)
        stop = asyncio.Event()
        task = asyncio.create_task(loop.run(stop))
        try:
            await scenario(loop)
        finally:
            stop.set()
            started = time.monotonic()
            await asyncio.wait_for(task, timeout=5.0)  # a loop that ignored stop would sleep 60 s
            await client.aclose()
        return time.monotonic() - started

    return asyncio.run(main())


@pytest.fixture
def core(file_store: FileStateStore) -> AgentCore:
    return AgentCore.from_store(file_store)


@pytest.fixture
def manager(signing_key: SigningKey) -> FakeManager:
    return FakeManager(signing_key)


def test_first_heartbeat_is_immediate_and_applies_the_document(
    core: AgentCore, manager: FakeManager, settings: AgentSettings, file_store: FileStateStore
) -> None:
    started = time.monotonic()

    async def scenario(loop: PullLoop) -> None:
        # Bounds far below the 60 s interval: a loop that waited for it would miss them by far.
        await wait_for_async(lambda: loop.heartbeats == 2, timeout=WAIT_S, what="two heartbeats answered")
        # The second answer planned the next heartbeat a whole interval (60 s) away: the loop sleeps, and
        # the two requests below are all it sent.
        planned = core.status
        assert planned.next_heartbeat_at is not None and planned.last_heartbeat_at is not None
        assert planned.next_heartbeat_at - planned.last_heartbeat_at == timedelta(seconds=60)

    stop_took = _run(core, manager, settings, scenario)

    assert manager.times[0] - started < 5
    # The second heartbeat reports the applied serial at once, so the operator sees it land.
    assert [r["serial"] for r in manager.requests] == [0, 5]
    first = manager.requests[0]
    assert first["serial"] == 0 and first["mode"] == "pull" and "location_id" not in first
    assert set(first["status"]) == {"hostname", "agent_version"} and first["status"]["hostname"] == "host-1"
    assert file_store.load_current() == manager.envelope
    assert stop_took < 5  # stop cuts the 60 s sleep short
    status = file_store.load_status()
    assert status is not None and status.last_heartbeat_at is not None and status.last_error is None


def test_update_now_cuts_the_sleep_short(
    core: AgentCore, manager: FakeManager, settings: AgentSettings
) -> None:
    async def scenario(loop: PullLoop) -> None:
        # The first heartbeat applies serial 5, the second reports it; answered, the loop sleeps 60 s.
        await wait_for_async(lambda: loop.heartbeats == 2, timeout=WAIT_S, what="two heartbeats answered")
        loop.update_now()
        await wait_for_async(
            lambda: len(manager.requests) == 3, timeout=WAIT_S, what="len(manager.requests) == 3"
        )

    _run(core, manager, settings, scenario)

    # The woken heartbeat carries what the first one applied, and learns nothing new.
    third = manager.requests[2]
    assert (third["serial"], third["location_id"]) == (5, LOCATION_ID)
    assert core.serial == 5


def test_connect_errors_back_off_and_keep_the_last_document(
    core: AgentCore,
    signing_key: SigningKey,
    settings: AgentSettings,
    file_store: FileStateStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    held = signing_key.sign_envelope(make_doc(serial=5))
    assert core.offer(held, "test").applied
    manager = FakeManager(signing_key, serial=6)
    manager.failures = [httpx.ConnectError("refused")] * 3
    seen_errors: list[str | None] = []

    async def scenario(loop: PullLoop) -> None:
        await wait_for_async(
            lambda: len(manager.requests) >= 1, timeout=WAIT_S, what="len(manager.requests) >= 1"
        )
        seen_errors.append(core.status.last_error)
        # Throughout the outage the agent keeps the last good document, in memory and on disk.
        assert core.serial == 5 and file_store.load_current() == held
        # The fourth heartbeat applies serial 6 and the fifth, sent at once, reports it.
        await wait_for_async(
            lambda: len(manager.requests) == 5, timeout=WAIT_S, what="len(manager.requests) == 5"
        )

    with caplog.at_level(logging.WARNING, logger="agent_stub.pull"):
        _run(core, manager, settings, scenario)

    assert [request["serial"] for request in manager.requests] == [5, 5, 5, 5, 6]
    gaps = [b - a for a, b in zip(manager.times[:3], manager.times[1:4], strict=True)]
    assert all(gap >= settings.retry_min_s * 0.9 for gap in gaps)
    assert seen_errors[0] is not None and "unreachable" in seen_errors[0]
    assert core.status.last_error is None
    # One warning for the outage, not one per retry.
    assert sum("manager unreachable" in r.getMessage() for r in caplog.records) == 1


def test_backoff_grows_exponentially_up_to_the_heartbeat_interval(
    core: AgentCore, signing_key: SigningKey
) -> None:
    # heartbeat_s 1 s caps the back-off below retry_max_s.
    assert core.offer(signing_key.sign_envelope(make_doc(serial=5, heartbeat_s=1)), "test").applied
    settings = AgentSettings(retry_min_s=0.1, retry_max_s=30.0)
    manager = FakeManager(signing_key)
    manager.failures = [httpx.ConnectError("refused")] * 6

    async def scenario() -> list[float]:
        loop, client = _loop(core, manager, settings, rng=MaxRandom())
        delays = [await loop.heartbeat_once() for _ in range(6)]
        await client.aclose()
        return delays

    assert asyncio.run(scenario()) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_backoff_is_jittered_within_bounds(core: AgentCore, signing_key: SigningKey) -> None:
    settings = AgentSettings(retry_min_s=0.5, retry_max_s=4.0)
    manager = FakeManager(signing_key)
    manager.failures = [httpx.ConnectError("refused")] * 40

    async def scenario() -> list[float]:
        loop, client = _loop(core, manager, settings, rng=random.Random(7))
        delays = [await loop.heartbeat_once() for _ in range(40)]
        await client.aclose()
        return delays

    delays = asyncio.run(scenario())
    assert all(0.5 <= d <= 4.0 for d in delays)
    assert delays[0] == 0.5  # the first ceiling is retry_min_s itself
    assert len(set(delays[5:])) > 10  # jittered, not a fixed schedule


def test_revoked_agent_logs_clearly_and_backs_off(
    core: AgentCore,
    manager: FakeManager,
    settings: AgentSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager.failures = [401]

    async def scenario() -> float:
        loop, client = _loop(core, manager, settings)
        delay = await loop.heartbeat_once()
        await client.aclose()
        return delay

    with caplog.at_level(logging.ERROR, logger="agent_stub.pull"):
        delay = asyncio.run(scenario())

    assert settings.retry_min_s <= delay <= settings.retry_max_s
    assert core.serial == 0
    assert "revoked" in caplog.text and "401" in caplog.text
    assert "401" in (core.status.last_error or "")


def test_update_now_during_back_off_retries_at_once(
    core: AgentCore, manager: FakeManager, signing_key: SigningKey
) -> None:
    settings = AgentSettings(retry_min_s=30.0, retry_max_s=60.0)  # a long back-off...
    manager.failures = [httpx.ConnectError("refused")]

    async def scenario(loop: PullLoop) -> None:
        await wait_for_async(
            lambda: len(manager.requests) == 1, timeout=WAIT_S, what="len(manager.requests) == 1"
        )
        loop.update_now()  # ...cut short by the user
        # The retry applies serial 5 and the next heartbeat, sent at once, reports it.
        await wait_for_async(
            lambda: len(manager.requests) == 3, timeout=WAIT_S, what="len(manager.requests) == 3"
        )

    _run(core, manager, settings, scenario)
    assert [request["serial"] for request in manager.requests] == [0, 0, 5]
    assert core.serial == 5


def test_a_rejected_document_is_not_applied_and_the_loop_goes_on(
    core: AgentCore, settings: AgentSettings, file_store: FileStateStore
) -> None:
    manager = FakeManager(SigningKey.generate())  # signed by a key the agent did not pin

    async def scenario(loop: PullLoop) -> None:
        await wait_for_async(
            lambda: len(manager.requests) == 1, timeout=WAIT_S, what="len(manager.requests) == 1"
        )
        loop.update_now()
        await wait_for_async(
            lambda: len(manager.requests) == 2, timeout=WAIT_S, what="len(manager.requests) == 2"
        )

    _run(core, manager, settings, scenario)
    assert core.serial == 0
    assert file_store.load_current() is None
    assert [r["serial"] for r in manager.requests] == [0, 0]


def test_a_broken_next_heartbeat_is_clamped(core: AgentCore, manager: FakeManager) -> None:
    manager.next_heartbeat_s = 0
    settings = AgentSettings(retry_min_s=0.25, retry_max_s=1.0)

    async def scenario() -> float:
        loop, client = _loop(core, manager, settings)
        assert await loop.heartbeat_once() == 0.0  # applied: report the new serial at once
        delay = await loop.heartbeat_once()  # unchanged: the broken interval applies, clamped
        await client.aclose()
        return delay

    assert asyncio.run(scenario()) == 0.25


# --- status: sent first, then only when changed or after a failure ----------------------------------


def test_status_is_sent_first_then_only_when_changed(core: AgentCore, manager: FakeManager) -> None:
    settings = AgentSettings(retry_min_s=0.01, retry_max_s=0.02)
    held: dict[str, int] = {}  # the same dict every time, changed in place: the loop must copy it

    async def scenario() -> None:
        loop, client = _loop(core, manager, settings)
        loop.status_sources.append(lambda: {"content": held})
        await loop.heartbeat_once()  # the first after start: the manager's copy is unknown
        await loop.heartbeat_once()  # applied serial reported; status unchanged
        await loop.heartbeat_once()
        held["definitions"] = 1
        await loop.heartbeat_once()  # changed: sent
        await loop.heartbeat_once()
        await client.aclose()

    asyncio.run(scenario())

    sent = [r.get("status") for r in manager.requests]
    first = {"hostname": "host-1", "agent_version": AGENT_VERSION, "content": {}}
    assert sent == [first, None, None, {**first, "content": {"definitions": 1}}, None]
    assert [r["serial"] for r in manager.requests] == [0, 5, 5, 5, 5]


@pytest.mark.parametrize(
    "failure",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("lost answer"), 503, 401, 422],
    ids=["connect", "timeout", "503", "401", "422"],
)
def test_status_is_sent_again_after_a_failed_heartbeat(
    core: AgentCore, manager: FakeManager, failure: Exception | int
) -> None:
    """A heartbeat that failed may or may not have reached the manager (a lost answer), and a refused
    one changed nothing there: the next one carries the status, changed or not."""
    settings = AgentSettings(retry_min_s=0.01, retry_max_s=0.02)
    held: dict[str, int] = {}

    async def scenario() -> None:
        loop, client = _loop(core, manager, settings)
        loop.status_sources.append(lambda: {"content": held})
        await loop.heartbeat_once()
        await loop.heartbeat_once()
        manager.failures = [failure]
        await loop.heartbeat_once()  # unchanged, fails
        await loop.heartbeat_once()  # status again
        await loop.heartbeat_once()
        held["definitions"] = 2
        manager.failures = [failure]
        await loop.heartbeat_once()  # changed, fails
        await loop.heartbeat_once()  # sent again
        await loop.heartbeat_once()
        await client.aclose()

    asyncio.run(scenario())

    sent = [r.get("status") for r in manager.requests]
    status = {"hostname": "host-1", "agent_version": AGENT_VERSION, "content": {}}
    changed = {**status, "content": {"definitions": 2}}
    assert sent == [status, None, None, status, None, changed, changed, None]


def test_status_is_sent_again_after_a_heartbeat_abandoned_in_flight(
    core: AgentCore, signing_key: SigningKey, settings: AgentSettings
) -> None:
    """Stopping the loop abandons a heartbeat in flight: whether it arrived is unknown."""
    release = asyncio.Event()
    requests: list[dict[str, Any]] = []

    class Slow:
        async def heartbeat(self, request: HeartbeatRequest) -> HeartbeatResponse:
            requests.append(request.model_dump(exclude_none=True))
            if len(requests) == 2:
                await release.wait()
            return HeartbeatResponse(changed=False, serial=0, next_heartbeat_s=60)

    async def scenario() -> None:
        loop = PullLoop(core, Slow(), settings)
        await loop.heartbeat_once()
        beat = asyncio.create_task(loop.heartbeat_once())
        await wait_for_async(lambda: len(requests) == 2, timeout=WAIT_S, what="len(requests) == 2")
        beat.cancel()
        with pytest.raises(asyncio.CancelledError):
            await beat
        await loop.heartbeat_once()
        await loop.heartbeat_once()

    asyncio.run(scenario())

    assert ["status" in r for r in requests] == [True, False, True, False]
