"""The log spool: bounded, crash-safe, exactly-once batches (the fast path is in test_log_uploads.py).

Spool behaviour is checked on both spools (`LogSpool` on disk, `MemoryLogSpool`); what only a disk can
show (a crash, another process, a torn line) on `LogSpool` alone.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent_stub.core import AgentCore
from agent_stub.log_spool import LogSpool, MemoryLogSpool, make_entry
from agent_stub.pull import PullLoop
from agent_stub.state import Identity, MemoryStateStore
from fabric_core.canonical import MAX_JSON_DEPTH
from fabric_core.settings import AgentSettings
from fabric_core.wire import LogBatch
from tests.agent_stub.fakes import StoringManager

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

    deep: dict = {}
    for _ in range(MAX_JSON_DEPTH):
        deep = {"a": deep}  # one level more than the manager takes
    with pytest.raises(ValueError, match="nest at most"):
        make_entry("info", "m", data=deep)
    assert make_entry("info", "m", data=deep["a"]).data == deep["a"]


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
        "import sys; from pathlib import Path; from agent_stub.log_spool import LogSpool\n"
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
