"""AgentRuntime with a fake manager and a fake link: pull always, push when told, transport reported."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from agent_stub.core import AgentCore
from agent_stub.errors import LinkUnavailable
from agent_stub.runtime import AgentRuntime
from agent_stub.state import MemoryStateStore
from fabric_core.settings import AgentSettings
from fabric_core.signing import SigningKey
from tests.agent_stub.conftest import WAIT_S, make_doc, make_identity, running
from tests.agent_stub.fakes import CMD, HELD, Broker, FakeManager
from tests.support.waiting import wait_for_async


class Rig:
    def __init__(
        self, core: AgentCore, key: SigningKey, settings: AgentSettings, manager: FakeManager
    ) -> None:
        self.core = core
        self.key = key
        self.manager = manager
        self.broker = Broker()
        self.runtime = AgentRuntime(core, manager, settings, self.broker.factory, rng=random.Random(2))

    def envelope(self, **doc: Any) -> bytes:
        return self.key.sign_envelope(make_doc(**doc))

    def run(self, scenario: Callable[[Rig], Awaitable[None]]) -> None:
        async def main() -> None:
            async with running(self.runtime.run, stop_within=10.0):
                await scenario(self)

        asyncio.run(main())


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


def _rig(key: SigningKey, settings: AgentSettings, *, mqtt: bool = True, **first_doc: Any) -> Rig:
    identity = make_identity(key, mqtt_url="mqtt://broker.test:1883" if mqtt else None)
    core = AgentCore(identity=identity, store=MemoryStateStore(identity))
    manager = FakeManager(key.sign_envelope(make_doc(serial=1, **first_doc)))
    return Rig(core, key, settings, manager)


async def _a_cycle_after_the_document(r: Rig) -> None:
    """Wait for the first heartbeat (it applies the document), the second (it reports the serial), and
    a third asked for now: a whole turn of the pull loop after the document was applied, by when a push
    loop started for that document would have made its link (its first step)."""
    await wait_for_async(lambda: len(r.manager.requests) == 2, timeout=WAIT_S, what="two heartbeats")
    r.runtime.update_now()
    await wait_for_async(lambda: len(r.manager.requests) == 3, timeout=WAIT_S, what="a third heartbeat")


def test_without_broker_credentials_it_only_pulls(key: SigningKey, push_settings: AgentSettings) -> None:
    rig = _rig(key, push_settings, mqtt=False, mode="push")

    async def scenario(r: Rig) -> None:
        await _a_cycle_after_the_document(r)

    rig.run(scenario)
    assert rig.core.mode == "push" and rig.core.serial == 1
    assert rig.broker.links == []
    assert {request.mode for request in rig.manager.requests} == {"pull"}


def test_a_pull_document_keeps_it_pulling(key: SigningKey, push_settings: AgentSettings) -> None:
    rig = _rig(key, push_settings, mode="pull")

    async def scenario(r: Rig) -> None:
        await _a_cycle_after_the_document(r)

    rig.run(scenario)
    assert rig.broker.links == [] and rig.core.transport == "pull"


def test_push_comes_and_goes_with_the_document_mode(key: SigningKey, push_settings: AgentSettings) -> None:
    rig = _rig(key, push_settings, mode="push")
    seen: list[str] = []

    async def scenario(r: Rig) -> None:
        # The first heartbeat brings a push document: the session starts, transport says push...
        await wait_for_async(
            lambda: r.runtime.push.connected, timeout=WAIT_S, what="r.runtime.push.connected"
        )
        await wait_for_async(
            lambda: r.core.transport == "push", timeout=WAIT_S, what='r.core.transport == "push"'
        )
        seen.append(r.core.status.transport or "")
        # ...and a heartbeat tells the manager at once, not an interval later.
        await wait_for_async(
            lambda: r.manager.requests[-1].mode == "push",
            timeout=WAIT_S,
            what='r.manager.requests[-1].mode == "push"',
        )

        # A pull document arrives over MQTT: the session ends cleanly, heartbeats go on.
        r.broker.link.deliver(HELD, r.envelope(serial=2, mode="pull"))
        await wait_for_async(
            lambda: ("close", True) in r.broker.calls,
            timeout=WAIT_S,
            what='("close", True) in r.broker.calls',
        )
        await wait_for_async(
            lambda: r.core.transport == "pull", timeout=WAIT_S, what='r.core.transport == "pull"'
        )
        count = len(r.manager.requests)
        r.runtime.update_now()
        await wait_for_async(
            lambda: len(r.manager.requests) > count, timeout=WAIT_S, what="len(r.manager.requests) > count"
        )
        assert r.manager.requests[-1].mode == "pull"

        # The manager switches back to push: the next heartbeat brings it, the session starts again.
        r.manager.envelope = r.envelope(serial=3, mode="push")
        r.runtime.update_now()
        await wait_for_async(
            lambda: r.core.transport == "push", timeout=WAIT_S, what='r.core.transport == "push"'
        )

    rig.run(scenario)
    assert seen == ["push"]
    assert rig.runtime.push.sessions == 2
    assert rig.core.status.transport is None  # stopped
    assert rig.broker.calls[-1] == ("close", False)


def test_update_now_command_heartbeats_at_once(key: SigningKey, push_settings: AgentSettings) -> None:
    rig = _rig(key, push_settings, mode="push")

    async def scenario(r: Rig) -> None:
        await wait_for_async(
            lambda: r.runtime.push.connected, timeout=WAIT_S, what="r.runtime.push.connected"
        )
        await wait_for_async(
            lambda: r.manager.requests[-1].mode == "push",
            timeout=WAIT_S,
            what='r.manager.requests[-1].mode == "push"',
        )
        # Answered, that heartbeat planned the next one an hour away: the loop sleeps.
        planned = r.core.status
        assert planned.next_heartbeat_at is not None and planned.last_heartbeat_at is not None
        assert planned.next_heartbeat_at - planned.last_heartbeat_at == timedelta(hours=1)
        count = len(r.manager.requests)
        r.broker.link.deliver(
            CMD, b'{"command": "update_now", "id": "c-9", "issued_at": "2024-05-01T12:00:00Z"}'
        )
        await wait_for_async(
            lambda: len(r.manager.requests) == count + 1,
            timeout=WAIT_S,
            what="len(r.manager.requests) == count + 1",
        )

    rig.run(scenario)


def test_transport_is_pull_while_the_broker_is_away(key: SigningKey, push_settings: AgentSettings) -> None:
    rig = _rig(key, push_settings, mode="push")

    async def scenario(r: Rig) -> None:
        await wait_for_async(
            lambda: r.core.transport == "push", timeout=WAIT_S, what='r.core.transport == "push"'
        )
        r.broker.connect_failures = [LinkUnavailable("broker down")] * 3
        r.broker.link.drop()  # the broker went away
        await wait_for_async(
            lambda: r.core.transport == "pull", timeout=WAIT_S, what='r.core.transport == "pull"'
        )
        r.runtime.update_now()
        await wait_for_async(
            lambda: r.manager.requests[-1].mode == "pull",
            timeout=WAIT_S,
            what='r.manager.requests[-1].mode == "pull"',
        )
        await wait_for_async(
            lambda: r.core.transport == "push", timeout=WAIT_S, what='r.core.transport == "push"'
        )
        # The manager last heard "pull": the session coming back is reported at once.
        await wait_for_async(
            lambda: r.manager.requests[-1].mode == "push",
            timeout=WAIT_S,
            what='r.manager.requests[-1].mode == "push"',
        )

    rig.run(scenario)


def test_a_session_back_after_a_blip_costs_no_heartbeat(
    key: SigningKey, push_settings: AgentSettings
) -> None:
    """After a broker restart the manager already holds "push" from each agent: none heartbeats."""
    rig = _rig(key, push_settings, mode="push")

    async def scenario(r: Rig) -> None:
        await wait_for_async(
            lambda: bool(r.manager.requests) and r.manager.requests[-1].mode == "push",
            timeout=WAIT_S,
            what='bool(r.manager.requests) and r.manager.requests[-1].mode == "push"',
        )
        count = len(r.manager.requests)
        # A heartbeat comes only from the pull loop's update_now(), which the runtime calls, or not, as
        # the session comes up (PullLoop.report_transport): record the calls.
        asked: list[str] = []
        ask = r.runtime.pull.update_now

        def update_now() -> None:
            asked.append("heartbeat")
            ask()

        r.runtime.pull.update_now = update_now  # type: ignore[method-assign]
        r.broker.link.drop()
        await wait_for_async(
            lambda: r.runtime.push.sessions == 2 and r.core.transport == "push",
            timeout=WAIT_S,
            what="the session back up",
        )
        # The session is up, and the runtime has decided in the same step: no heartbeat asked for.
        assert asked == [] and len(r.manager.requests) == count

    rig.run(scenario)
