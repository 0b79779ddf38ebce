"""The log on the move: the agent's own events, and security entries bringing the heartbeat forward.

Timing is observed by counting heartbeats with a long heartbeat interval and a short `priority_delay_s`,
never by measuring durations. Where a test checks that no heartbeat is brought forward, it lets four
gathering delays pass (`_let_a_would_be_upload_pass`): a priority upload is a timer, and nothing marks a
timer that was never armed.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent_stub.core import AgentCore
from agent_stub.log_spool import LogSpool, MemoryLogSpool, spool_dir
from agent_stub.log_uploads import LogUploads
from agent_stub.pidfile import PID_FILE
from agent_stub.runtime import AgentRuntime
from agent_stub.state import FileStateStore, Identity, MemoryStateStore
from fabric_core.settings import AgentSettings
from fabric_core.signing import SigningKey
from fabric_core.wire import LogBatch
from tests.agent_stub.agent_process import HeartbeatServer, running_agent, stop_agent
from tests.agent_stub.conftest import WAIT_S, make_doc, make_identity, running
from tests.agent_stub.fakes import Broker, StoringManager
from tests.support.waiting import wait_for, wait_for_async

ROOT = Path(__file__).resolve().parents[2]


class Rig:
    """A runtime on a memory state store, a fake manager that says "come back in an hour"."""

    def __init__(self, key: SigningKey, settings: AgentSettings, *, spool: LogSpool | None = None) -> None:
        self.key = key
        identity = make_identity(key)
        self.core = AgentCore(identity=identity, store=MemoryStateStore(identity))
        self.manager = StoringManager(key.sign_envelope(make_doc(serial=1)))
        self.runtime = AgentRuntime(
            self.core,
            self.manager,
            settings,
            Broker().factory,
            rng=random.Random(3),
            spool=spool,
            priority_delay_s=0.05,
        )

    @property
    def beats(self) -> int:
        return len(self.manager.requests)

    def run(self, scenario: Callable[[Rig], Awaitable[None]]) -> None:
        async def main() -> None:
            async with running(self.runtime.run, stop_within=10.0):
                # The first heartbeat applies serial 1, the second reports it; then an hour's sleep.
                await wait_for_async(
                    lambda: self.runtime.pull.heartbeats == 2,
                    timeout=WAIT_S,
                    what="self.runtime.pull.heartbeats == 2",
                )
                await scenario(self)

        asyncio.run(main())


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


async def _let_a_would_be_upload_pass(r: Rig) -> None:
    """Not a wait for an event: an upload brought forward comes `gather_s` (0.05 s) after what asked for
    it, so four of those passing without one is the check."""
    await asyncio.sleep(4 * r.runtime.logs.gather_s)  # not a wait: four gathering delays pass


def test_a_security_entry_brings_the_heartbeat_forward(key: SigningKey, settings: AgentSettings) -> None:
    async def scenario(r: Rig) -> None:
        r.runtime.spool.append("info", "routine")
        await _let_a_would_be_upload_pass(r)
        assert r.beats == 2  # no upload for an ordinary entry

        for n in range(3):  # one incident: its entries travel together
            r.runtime.spool.append("security", f"threat {n}", category="antivirus")
        await wait_for_async(lambda: r.beats == 3, timeout=WAIT_S, what="r.beats == 3")
        sent = r.manager.requests[2].logs
        assert sent is not None
        assert [e.message for e in sent.entries if e.level == "security"] == [
            "threat 0",
            "threat 1",
            "threat 2",
        ]
        await wait_for_async(
            lambda: not r.runtime.spool.count(), timeout=WAIT_S, what="not r.runtime.spool.count()"
        )
        await _let_a_would_be_upload_pass(r)
        assert r.beats == 3  # nothing urgent left: back to the hour's sleep
        assert r.runtime.logs.priority_uploads == 1

    Rig(key, settings).run(scenario)


def test_security_entries_behind_a_batch_in_flight_follow_at_once(
    key: SigningKey, settings: AgentSettings
) -> None:
    async def scenario(r: Rig) -> None:
        spool = r.runtime.spool
        spool.append("info", "old")
        in_flight = spool.next_batch()  # formed by a heartbeat whose answer is still awaited
        spool.append("security", "threat")
        await wait_for_async(lambda: r.beats == 4, timeout=WAIT_S, what="r.beats == 4")
        assert r.manager.requests[2].logs == in_flight
        last = r.manager.requests[3].logs
        assert last is not None and [e.message for e in last.entries] == ["threat"]

    Rig(key, settings).run(scenario)


def test_the_agent_logs_applied_and_forged_documents(key: SigningKey, settings: AgentSettings) -> None:
    async def scenario(r: Rig) -> None:
        forged = SigningKey.generate().sign_envelope(make_doc(serial=9))
        assert not r.core.offer(forged, source="mqtt").applied
        await wait_for_async(
            lambda: r.beats == 3, timeout=WAIT_S, what="r.beats == 3"
        )  # a security event: uploaded at once

    rig = Rig(key, settings)
    rig.run(scenario)

    entries = rig.manager.uploaded()
    applied = next(e for e in entries if e.category == "policy")
    assert (applied.level, applied.message) == ("info", "applied serial 1 from heartbeat")
    assert applied.data == {"serial": 1, "source": "heartbeat", "group_id": 3, "location_id": 7}
    rejected = next(e for e in entries if e.category == "security")
    assert rejected.level == "security"
    assert rejected.message.startswith("rejected a document from mqtt: ")
    assert rejected.data is not None and rejected.data["source"] == "mqtt"


def test_the_agent_logs_when_the_manager_goes_away_and_comes_back(
    key: SigningKey, settings: AgentSettings
) -> None:
    async def scenario(r: Rig) -> None:
        r.manager.unreachable = 3
        r.runtime.update_now()
        await wait_for_async(
            lambda: r.runtime.pull.heartbeats == 3, timeout=WAIT_S, what="r.runtime.pull.heartbeats == 3"
        )  # after three failures
        r.runtime.update_now()
        await wait_for_async(
            lambda: r.runtime.pull.heartbeats == 4, timeout=WAIT_S, what="r.runtime.pull.heartbeats == 4"
        )

    rig = Rig(key, settings)
    rig.run(scenario)

    manager = [e for e in rig.manager.uploaded() if e.category == "manager"]
    assert [(e.level, e.data) for e in manager] == [
        ("warning", {"reachable": False}),
        ("info", {"reachable": True}),
    ]
    assert manager[0].message == "manager unreachable: connection refused"
    assert manager[1].message == "manager reachable again after 3 failed attempt(s)"


def test_a_broken_spool_never_fails_a_heartbeat(key: SigningKey, settings: AgentSettings) -> None:
    class BrokenSpool(MemoryLogSpool):
        def next_batch(self) -> LogBatch | None:
            raise OSError("disk on fire")

    async def scenario(r: Rig) -> None:
        r.runtime.update_now()
        await wait_for_async(
            lambda: r.runtime.pull.heartbeats == 3, timeout=WAIT_S, what="r.runtime.pull.heartbeats == 3"
        )

    Rig(key, settings, spool=BrokenSpool()).run(scenario)


def test_notice_from_another_thread_brings_the_heartbeat_forward(
    key: SigningKey, settings: AgentSettings, tmp_path: Path
) -> None:
    """What SIGUSR2 does when `policycast-agent log` appended a security entry in another process."""
    directory = tmp_path / "spool"

    async def scenario(r: Rig) -> None:
        other = LogSpool(directory)  # another process's view: its appends notify no one here
        await asyncio.to_thread(other.append, "security", "from outside")
        await _let_a_would_be_upload_pass(r)
        assert r.beats == 2
        await asyncio.to_thread(r.runtime.logs.notice)
        await wait_for_async(lambda: r.beats == 3, timeout=WAIT_S, what="r.beats == 3")
        sent = r.manager.requests[2].logs
        assert sent is not None and [e.message for e in sent.entries] == ["from outside"]

    Rig(key, settings, spool=LogSpool(directory)).run(scenario)


def test_security_entries_waiting_at_start_are_uploaded_at_once() -> None:
    calls: list[str] = []
    uploads = LogUploads(MemoryLogSpool(), lambda: calls.append("update"), priority_delay_s=0.01)
    uploads.spool.append("security", "while the agent was down")

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(uploads.run(stop))
        await wait_for_async(lambda: calls == ["update"], timeout=WAIT_S, what='calls == ["update"]')
        stop.set()
        await task

    asyncio.run(main())


# --- policycast-agent log ----------------------------------------------------------------------------


def _agent_cli(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "agent_stub", *args, "--state-dir", str(state_dir)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_log_command_appends_to_the_spool_from_another_process(
    file_store: FileStateStore, state_dir: Path
) -> None:
    result = _agent_cli(
        "log", "--level", "warning", "--category", "antivirus", "scan failed", state_dir=state_dir
    )

    assert result.returncode == 0, result.stderr
    batch = LogSpool(spool_dir(state_dir)).next_batch()
    assert batch is not None
    [entry] = batch.entries
    assert (entry.level, entry.category, entry.message) == ("warning", "antivirus", "scan failed")


def test_log_command_needs_an_enrolled_agent_and_a_known_level(
    file_store: FileStateStore, state_dir: Path, tmp_path: Path
) -> None:
    missing = _agent_cli("log", "hello", state_dir=tmp_path / "nowhere")
    assert missing.returncode == 1
    assert "not enrolled" in missing.stderr and "Traceback" not in missing.stderr

    loud = _agent_cli("log", "--level", "loud", "hello", state_dir=state_dir)
    assert loud.returncode == 2
    assert "level" in loud.stderr and "Traceback" not in loud.stderr


def test_log_command_signals_the_running_agent_for_security_entries(
    file_store: FileStateStore, state_dir: Path
) -> None:
    """A stand-in agent process records SIGUSR2; the pid file points at it."""
    received = state_dir / "sigusr2"
    stand_in = (
        "import signal, sys, time; from pathlib import Path\n"
        "signal.signal(signal.SIGUSR2, lambda *a: Path(sys.argv[1]).write_text('yes'))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"  # not a wait: the stand-in idles until killed (30 s at most, should we die first)
    )
    agent = subprocess.Popen(
        [sys.executable, "-c", stand_in, str(received)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert agent.stdout is not None and agent.stdout.readline() == "ready\n"
        (state_dir / PID_FILE).write_text(f"{agent.pid}\n")

        assert _agent_cli("log", "ordinary", state_dir=state_dir).returncode == 0
        assert not received.exists()
        assert _agent_cli("log", "--level", "security", "threat", state_dir=state_dir).returncode == 0
        wait_for(received.exists, timeout=10, what="received.exists()")
    finally:
        agent.kill()
        agent.wait()


def test_a_real_agent_uploads_a_security_entry_logged_by_the_cli(
    http_manager: str, state_dir: Path, identity: Identity
) -> None:
    """End to end, with processes: the file spool, SIGUSR2, the fast path (about GATHER_S, 5 s)."""
    FileStateStore(state_dir).save_identity(identity.model_copy(update={"server": http_manager}))
    with running_agent(state_dir, "--state-dir", str(state_dir)) as agent:
        # Serial 42 applied by the first heartbeat, reported (with the "applied" entry) by the second.
        wait_for(
            lambda: len(HeartbeatServer.heartbeats) == 2,
            timeout=15,
            what="len(HeartbeatServer.heartbeats) == 2",
        )
        wait_for((state_dir / PID_FILE).exists, timeout=WAIT_S, what="(state_dir / PID_FILE).exists()")
        applied = HeartbeatServer.heartbeats[1]["logs"]["entries"]
        assert [(e["category"], e["message"]) for e in applied] == [
            ("policy", "applied serial 42 from heartbeat")
        ]

        result = _agent_cli(
            "log", "--level", "security", "--category", "av", "threat found", state_dir=state_dir
        )
        assert result.returncode == 0, result.stderr
        # The manager said "in an hour": a third heartbeat is the fast path at work.
        wait_for(
            lambda: len(HeartbeatServer.heartbeats) == 3,
            timeout=30,
            what="len(HeartbeatServer.heartbeats) == 3",
        )
        [entry] = HeartbeatServer.heartbeats[2]["logs"]["entries"]
        assert (entry["level"], entry["category"], entry["message"]) == ("security", "av", "threat found")

        stop_agent(agent, timeout=10)
