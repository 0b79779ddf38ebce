"""The log spool: bounded, crash-safe, exactly-once batches; the fast path for security entries.

Spool behaviour is checked on both spools (`LogSpool` on disk, `MemoryLogSpool`); what only a disk can
show (a crash, another process, a torn line) on `LogSpool` alone. Timing is observed by counting
heartbeats with a long heartbeat interval and a short `priority_delay_s`, never by measuring durations.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent_stub.core import AgentCore
from agent_stub.errors import ManagerRejected, ManagerUnreachable
from agent_stub.pidfile import PID_FILE
from agent_stub.pull import PullLoop
from agent_stub.runtime import AgentRuntime
from agent_stub.spool import LogSpool, LogUploads, MemoryLogSpool, make_entry, spool_dir
from agent_stub.state import FileStateStore, Identity, MemoryStateStore
from fabric_core.settings import AgentSettings
from fabric_core.signing import SigningKey
from fabric_core.wire import HeartbeatRequest, HeartbeatResponse, LogBatch, LogEntry
from tests.agent_stub.agent_process import HeartbeatServer, running_agent, stop_agent
from tests.agent_stub.conftest import make_doc, make_identity, wait_until
from tests.agent_stub.fakes import Broker, FakeManager

ROOT = Path(__file__).resolve().parents[2]

SpoolFactory = Callable[..., LogSpool]


@pytest.fixture(params=["file", "memory"])
def make_spool(request: pytest.FixtureRequest, tmp_path: Path) -> SpoolFactory:
    """Builds the spool under test; the file spool always over the same directory."""
    if request.param == "memory":
        return MemoryLogSpool
    return lambda **options: LogSpool(tmp_path / "spool", **options)


def messages(batch: LogBatch | None) -> list[str]:
    assert batch is not None
    return [entry.message for entry in batch.entries]


def drain(spool: LogSpool) -> list[LogBatch]:
    batches = []
    while (batch := spool.next_batch()) is not None:
        batches.append(batch)
        spool.acknowledge(batch.batch_id)
    return batches


# --- batches and acknowledgements --------------------------------------------------------------------


def test_a_batch_is_the_same_until_acknowledged_then_only_its_entries_go(make_spool: SpoolFactory) -> None:
    spool = make_spool()
    assert spool.next_batch() is None
    for n in range(3):
        spool.append("info", f"m{n}", category="test", data={"n": n})

    first = spool.next_batch()
    spool.append("error", "later")  # after the batch was formed: not part of it
    again = spool.next_batch()

    assert again == first
    assert messages(first) == ["m0", "m1", "m2"]
    assert first is not None and first.entries[1].category == "test" and first.entries[1].data == {"n": 1}
    spool.acknowledge("not-this-one")
    assert spool.next_batch() == first
    spool.acknowledge(first.batch_id)
    rest = spool.next_batch()
    assert messages(rest) == ["later"]
    assert rest is not None and rest.batch_id != first.batch_id
    spool.acknowledge(rest.batch_id)
    spool.acknowledge(rest.batch_id)  # a late duplicate acknowledgement changes nothing
    assert spool.next_batch() is None
    assert spool.count() == 0


def test_a_full_spool_drops_the_oldest_first_and_reports_how_many(make_spool: SpoolFactory) -> None:
    spool = make_spool(max_entries=5)
    for n in range(8):
        spool.append("info", f"m{n}")

    assert spool.dropped == 3
    assert spool.count() == 5
    batch = spool.next_batch()
    assert batch is not None
    notice, *kept = batch.entries
    assert (notice.level, notice.category) == ("warning", "spool")
    assert notice.data == {"dropped": 3, "dropped_total": 3}
    assert [entry.message for entry in kept] == ["m3", "m4", "m5", "m6", "m7"]
    spool.acknowledge(batch.batch_id)

    spool.append("info", "m8")
    assert messages(spool.next_batch()) == ["m8"]  # reported once only
    assert spool.dropped == 3  # the counter is a total


def test_a_full_spool_drops_ordinary_entries_before_security_ones(make_spool: SpoolFactory) -> None:
    spool = make_spool(max_entries=3)
    spool.append("security", "s0")
    spool.append("info", "i0")
    spool.append("info", "i1")
    spool.append("security", "s1")  # full: i0 goes, though s0 is older
    spool.append("security", "s2")  # i1 goes
    spool.append("security", "s3")  # only security left: the oldest, s0, goes

    assert spool.dropped == 3
    assert messages(spool.next_batch())[1:] == ["s1", "s2", "s3"]


def test_security_entries_go_first(make_spool: SpoolFactory) -> None:
    spool = make_spool(batch_size=2)
    spool.append("info", "i0")
    spool.append("info", "i1")
    spool.append("security", "s0")

    assert [messages(batch) for batch in drain(spool)] == [["s0", "i0"], ["i1"]]


def test_a_long_backlog_uploads_in_batches_of_at_most_batch_size(make_spool: SpoolFactory) -> None:
    spool = make_spool(batch_size=500)
    for n in range(1200):
        spool.append("info", f"m{n}")

    batches = drain(spool)

    assert [len(batch.entries) for batch in batches] == [500, 500, 200]
    assert [m for batch in batches for m in messages(batch)] == [f"m{n}" for n in range(1200)]
    assert len({batch.batch_id for batch in batches}) == 3


def test_batches_also_stay_under_a_byte_budget(make_spool: SpoolFactory) -> None:
    spool = make_spool(max_batch_bytes=1000)
    for n in range(10):
        spool.append("info", f"{n}" + "x" * 300)

    sizes = [len(batch.entries) for batch in drain(spool)]

    assert sum(sizes) == 10
    assert max(sizes) <= 3  # about 400 bytes an entry


def test_a_batch_refused_as_too_large_is_split_and_a_lone_entry_dropped(make_spool: SpoolFactory) -> None:
    spool = make_spool()
    for n in range(4):
        spool.append("info", f"m{n}")
    whole = spool.next_batch()
    assert whole is not None

    spool.refused(whole.batch_id)
    first = spool.next_batch()
    assert messages(first) == ["m0", "m1"]
    assert first is not None and first.batch_id != whole.batch_id
    assert spool.batch_size == 2  # later batches are no larger

    spool.refused(first.batch_id)
    lone = spool.next_batch()
    assert messages(lone) == ["m0"]
    assert lone is not None
    spool.refused(lone.batch_id)  # a single entry refused: dropped, so nothing blocks for ever
    assert spool.dropped == 1

    rest = [messages(batch) for batch in drain(spool)]
    assert rest[:2] == [["m1"], ["m2", "m3"]]
    assert rest[2][0].startswith("1 log entries dropped")


def test_urgent_while_a_security_entry_waits_or_travels(make_spool: SpoolFactory) -> None:
    spool = make_spool()
    spool.append("critical", "not a security entry")
    assert not spool.urgent()
    spool.append("security", "forged document")
    assert spool.urgent()
    batch = spool.next_batch()
    assert batch is not None
    assert spool.urgent()  # in flight, not yet stored
    spool.acknowledge(batch.batch_id)
    assert not spool.urgent()


def test_entries_are_made_acceptable_to_the_manager() -> None:
    long = make_entry("info", "x" * 5000)
    assert len(long.message) == 4096 and long.message.endswith("\u2026")
    assert make_entry("info", "a\x00b", category="c\x00").message == "a\ufffdb"
    assert make_entry("info", "big", data={"blob": "x" * 20_000}).data == {"truncated": True, "bytes": 20_011}
    with pytest.raises(ValueError, match="level"):
        make_entry("loud", "m")
    with pytest.raises(ValueError, match="category"):
        make_entry("info", "m", category="")
    with pytest.raises(ValueError, match="plain JSON"):
        make_entry("info", "m", data={"x": float("nan")})
    with pytest.raises(ValueError, match="plain JSON"):
        make_entry("info", "m", data={"x": 2**70})


# --- on disk: crashes, other processes, damage -------------------------------------------------------


def test_nothing_is_lost_across_a_crash(tmp_path: Path) -> None:
    before = LogSpool(tmp_path / "spool", batch_size=3)
    for n in range(5):
        before.append("info", f"m{n}")
    sent = before.next_batch()  # handed to a heartbeat; the agent dies before the answer
    assert sent is not None
    before.append("security", "late")
    del before

    after = LogSpool(tmp_path / "spool", batch_size=3)
    assert after.next_batch() == sent  # the same id: the manager stores it once
    after.acknowledge(sent.batch_id)
    assert [messages(batch) for batch in drain(after)] == [["late", "m3", "m4"]]
    # Uploaded: segments and batch files are gone.
    assert not [path for lane in ("normal", "security") for path in (tmp_path / "spool" / lane).glob("*")]
    assert not list((tmp_path / "spool" / "batches").iterdir())


def test_the_dropped_counter_survives_a_restart(tmp_path: Path) -> None:
    spool = LogSpool(tmp_path / "spool", max_entries=2)
    for n in range(4):
        spool.append("info", f"m{n}")

    again = LogSpool(tmp_path / "spool", max_entries=2)

    assert again.dropped == 2
    batch = again.next_batch()
    assert batch is not None and batch.entries[0].data == {"dropped": 2, "dropped_total": 2}


def test_a_torn_last_line_is_cut_off_and_the_rest_kept(tmp_path: Path) -> None:
    spool = LogSpool(tmp_path / "spool")
    spool.append("info", "m0")
    segment = next((tmp_path / "spool" / "normal").glob("*.jsonl"))
    with segment.open("ab") as handle:
        handle.write(b'{"ts": "2024-05-01T00:00:00Z", "mess')  # a crash in the middle of an append

    spool.append("info", "m1")

    assert messages(spool.next_batch()) == ["m0", "m1"]


def test_an_unreadable_line_is_counted_as_dropped(tmp_path: Path) -> None:
    spool = LogSpool(tmp_path / "spool")
    spool.append("info", "m0")
    segment = next((tmp_path / "spool" / "normal").glob("*.jsonl"))
    with segment.open("ab") as handle:
        handle.write(b"garbage\n")
    spool.append("info", "m1")

    batch = spool.next_batch()

    assert messages(batch)[1:] == ["m0", "m1"]
    assert batch is not None and batch.entries[0].category == "spool"
    assert spool.dropped == 1


def test_threads_and_another_process_append_to_the_same_spool(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    script = (
        "import sys; from pathlib import Path; from agent_stub.spool import LogSpool\n"
        "spool = LogSpool(Path(sys.argv[1]))\n"
        "for n in range(100): spool.append('info', f'p{n}')\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(directory)], cwd=ROOT)
    spool = LogSpool(directory)

    def append(name: str) -> None:
        for n in range(50):
            spool.append("info", f"{name}{n}")

    threads = [threading.Thread(target=append, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert child.wait(timeout=30) == 0

    got = [m for batch in drain(spool) for m in messages(batch)]
    assert sorted(got) == sorted([f"p{n}" for n in range(100)] + [f"{c}{n}" for c in "ab" for n in range(50)])
    for name in "pab":  # each writer's entries in its order
        mine = [m for m in got if m[0] == name]
        assert mine == sorted(mine, key=lambda m: int(m[1:]))


# --- with the pull loop: lost answers, refused batches -----------------------------------------------


class StoringManager(FakeManager):
    """Stores log batches once per id, like the manager; can lose answers or refuse big batches."""

    def __init__(self, envelope: bytes | None = None, *, next_heartbeat_s: int = 3600) -> None:
        super().__init__(envelope, next_heartbeat_s=next_heartbeat_s)
        self.stored: dict[str, list[str]] = {}
        self.lose_answers = 0
        self.unreachable = 0
        self.max_entries: int | None = None

    async def heartbeat(self, request: HeartbeatRequest) -> HeartbeatResponse:
        if self.unreachable:
            self.unreachable -= 1
            self.requests.append(request)
            raise ManagerUnreachable("connection refused")
        logs = request.logs
        if logs is not None and self.max_entries is not None and len(logs.entries) > self.max_entries:
            self.requests.append(request)
            raise ManagerRejected(413, "log batch too large")
        if logs is not None:
            self.stored.setdefault(logs.batch_id, [entry.message for entry in logs.entries])
        response = await super().heartbeat(request)
        if self.lose_answers:
            self.lose_answers -= 1
            raise ManagerUnreachable("read timed out")  # stored, but the agent never hears so
        return response

    def messages(self) -> list[str]:
        return [m for batch in self.stored.values() for m in batch]

    def uploaded(self) -> list[LogEntry]:
        """Every entry that reached the manager, each batch counted once (as the manager stores it)."""
        batches = {r.logs.batch_id: r.logs.entries for r in self.requests if r.logs is not None}
        return [entry for entries in batches.values() for entry in entries]


def _pull(identity: Identity, manager: StoringManager, settings: AgentSettings, spool: LogSpool) -> PullLoop:
    core = AgentCore(identity=identity, store=MemoryStateStore(identity))
    pull = PullLoop(core, manager, settings, rng=random.Random(1))
    pull.uploads = spool
    return pull


def test_a_lost_answer_resends_the_same_batch_and_it_is_stored_once(
    make_spool: SpoolFactory, identity: Identity, settings: AgentSettings
) -> None:
    manager = StoringManager()
    spool = make_spool()
    pull = _pull(identity, manager, settings, spool)
    for n in range(3):
        spool.append("info", f"m{n}")

    async def scenario() -> None:
        manager.lose_answers = 1
        await pull.heartbeat_once()  # stored, answer lost
        await pull.heartbeat_once()  # the retry

    asyncio.run(scenario())

    sent = [request.logs.batch_id for request in manager.requests if request.logs]
    assert len(sent) == 2 and sent[0] == sent[1]
    assert manager.messages() == ["m0", "m1", "m2"]
    assert spool.next_batch() is None


def test_batches_the_manager_finds_too_large_get_through_in_parts(
    make_spool: SpoolFactory, identity: Identity, settings: AgentSettings
) -> None:
    manager = StoringManager()
    manager.max_entries = 3
    spool = make_spool()
    pull = _pull(identity, manager, settings, spool)
    for n in range(10):
        spool.append("info", f"m{n}")

    async def scenario() -> None:
        for _ in range(12):
            await pull.heartbeat_once()

    asyncio.run(scenario())

    assert sorted(manager.messages(), key=lambda m: int(m[1:])) == [f"m{n}" for n in range(10)]
    assert spool.next_batch() is None
    assert pull.heartbeats > 0  # heartbeats get through again: no batch holds them back


# --- in the runtime: the agent's own events, the fast path -------------------------------------------


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
            stop = asyncio.Event()
            task = asyncio.create_task(self.runtime.run(stop))
            try:
                # The first heartbeat applies serial 1, the second reports it; then an hour's sleep.
                await wait_until(lambda: self.runtime.pull.heartbeats == 2)
                await scenario(self)
            finally:
                stop.set()
                await asyncio.wait_for(task, timeout=10.0)

        asyncio.run(main())


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


def test_a_security_entry_brings_the_heartbeat_forward(key: SigningKey, settings: AgentSettings) -> None:
    async def scenario(r: Rig) -> None:
        r.runtime.spool.append("info", "routine")
        await asyncio.sleep(0.2)  # four times the gathering delay: no upload for an ordinary entry
        assert r.beats == 2

        for n in range(3):  # one incident: its entries travel together
            r.runtime.spool.append("security", f"threat {n}", category="antivirus")
        await wait_until(lambda: r.beats == 3)
        sent = r.manager.requests[2].logs
        assert sent is not None
        assert [e.message for e in sent.entries if e.level == "security"] == [
            "threat 0",
            "threat 1",
            "threat 2",
        ]
        await wait_until(lambda: not r.runtime.spool.count())
        await asyncio.sleep(0.2)
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
        await wait_until(lambda: r.beats == 4)
        assert r.manager.requests[2].logs == in_flight
        last = r.manager.requests[3].logs
        assert last is not None and [e.message for e in last.entries] == ["threat"]

    Rig(key, settings).run(scenario)


def test_the_agent_logs_applied_and_forged_documents(key: SigningKey, settings: AgentSettings) -> None:
    async def scenario(r: Rig) -> None:
        forged = SigningKey.generate().sign_envelope(make_doc(serial=9))
        assert not r.core.offer(forged, source="mqtt").applied
        await wait_until(lambda: r.beats == 3)  # a security event: uploaded at once

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
        await wait_until(lambda: r.runtime.pull.heartbeats == 3)  # after three failures
        r.runtime.update_now()
        await wait_until(lambda: r.runtime.pull.heartbeats == 4)

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
        await wait_until(lambda: r.runtime.pull.heartbeats == 3)

    Rig(key, settings, spool=BrokenSpool()).run(scenario)


def test_notice_from_another_thread_brings_the_heartbeat_forward(
    key: SigningKey, settings: AgentSettings, tmp_path: Path
) -> None:
    """What SIGUSR2 does when `policycast-agent log` appended a security entry in another process."""
    directory = tmp_path / "spool"

    async def scenario(r: Rig) -> None:
        other = LogSpool(directory)  # another process's view: its appends notify no one here
        await asyncio.to_thread(other.append, "security", "from outside")
        await asyncio.sleep(0.2)
        assert r.beats == 2
        await asyncio.to_thread(r.runtime.logs.notice)
        await wait_until(lambda: r.beats == 3)
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
        await wait_until(lambda: calls == ["update"])
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
        "time.sleep(30)\n"
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
        asyncio.run(wait_until(received.exists, within=10))
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
        asyncio.run(wait_until(lambda: len(HeartbeatServer.heartbeats) == 2, within=15))
        asyncio.run(wait_until((state_dir / PID_FILE).exists, within=5))
        applied = HeartbeatServer.heartbeats[1]["logs"]["entries"]
        assert [(e["category"], e["message"]) for e in applied] == [
            ("policy", "applied serial 42 from heartbeat")
        ]

        result = _agent_cli(
            "log", "--level", "security", "--category", "av", "threat found", state_dir=state_dir
        )
        assert result.returncode == 0, result.stderr
        # The manager said "in an hour": a third heartbeat is the fast path at work.
        asyncio.run(wait_until(lambda: len(HeartbeatServer.heartbeats) == 3, within=30))
        [entry] = HeartbeatServer.heartbeats[2]["logs"]["entries"]
        assert (entry["level"], entry["category"], entry["message"]) == ("security", "av", "threat found")

        stop_agent(agent, timeout=10)
