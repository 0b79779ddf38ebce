"""The agent's log spool: entries wait on disk until a heartbeat has uploaded them (DESIGN.md §5, §6).

Layout, under `<state_dir>/spool/` (0700; files 0600):

    .lock                 flock'd around every operation, by the agent and by `policycast-agent log`
    security/, normal/    two lanes of append-only JSON-lines segments named by their first sequence
                          number (`0000000000000256.jsonl`); security entries are uploaded first
    state.json            how far each lane is consumed, the dropped counters and the ids of the
                          batches formed but not yet acknowledged (replaced atomically)
    batches/<id>.json     the content of each such batch

Why segments of JSON lines rather than one file per entry: an append is one `write` + `fsync` on a file
that is already there (a file per entry costs a create, an fsync, a rename and a directory fsync, and a
full spool of 10,000 entries would be 10,000 inodes). A torn last line (a crash mid-write) is cut off by
the next append, which holds the lock; readers only ever see complete lines.

Exactly once (DESIGN.md §6): a batch is written to `batches/` and named in `state.json` before it is
first handed out, and handed out again, with the same id, until it is acknowledged; the manager stores a
batch once per (agent, batch id). Batch ids are random (uuid4), so a re-created spool never reuses one
(a reused id would be silently dropped by the manager as a retry).

Bounded: at most `max_entries` entries wait besides the batches in flight; when full, the oldest
entries go first, ordinary ones before security ones. How many were dropped is persisted and reported
to the manager in the next batch, as an entry of category `spool` (level `warning`).

`MemoryLogSpool` is the same without a disk, for tests and the fleet simulator. `LogUploads` plugs a
spool into the pull loop and schedules a heartbeat soon after a security entry (SEPM's fast path).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from agent_stub.core import ApplyOutcome, Outcome
from agent_stub.files import append_durably, fsync_dir, write_atomically
from fabric_core.canonical import canonical_json
from fabric_core.wire import MAX_LOG_ENTRIES, LogBatch, LogEntry, LogLevel

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
BATCHES_DIR = "batches"

Lane = Literal["security", "normal"]
UPLOAD_ORDER: tuple[Lane, ...] = ("security", "normal")
DROP_ORDER: tuple[Lane, ...] = ("normal", "security")
"""When the spool is full, ordinary entries go before security ones (each lane oldest first)."""

MAX_MESSAGE_CHARS = 4096  # LogEntry.message's limit
MAX_DATA_BYTES = 16 * 1024
MAX_BATCH_BYTES = 512 * 1024
"""Half the manager's default body limit (1 MiB), leaving room for the rest of the heartbeat."""
SEGMENT_ENTRIES = 256
SEGMENT_BYTES = 256 * 1024
PRIORITY_DELAY_S = 60.0
GATHER_S = 5.0
_DIR_MODE = 0o700
_FILE_MODE = 0o600

SpoolListener = Callable[[LogEntry], None]


def spool_dir(state_dir: Path) -> Path:
    return Path(state_dir) / SPOOL_DIR


# --- entries -----------------------------------------------------------------------------------------


def make_entry(
    level: str, message: str, *, category: str = "agent", data: dict[str, Any] | None = None
) -> LogEntry:
    """A valid entry now; raises ValueError for a bad level or category, or data that is not plain JSON.

    Long messages and large data are cut rather than refused, and NUL characters replaced: the manager
    refuses those, and a batch it refuses would otherwise hold every later heartbeat back.
    """
    message = message.replace("\x00", "\ufffd")
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "\u2026"
    try:
        return LogEntry(
            ts=datetime.now(UTC),
            level=level,  # validated here
            category=category.replace("\x00", "\ufffd"),
            message=message,
            data=_bounded_data(data),
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ValueError(f"invalid log entry: {error['loc'][0]}: {error['msg']}") from exc


def _bounded_data(data: dict[str, Any] | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        encoded = canonical_json(data)
        plain = orjson.loads(encoded) == data  # NaN and Infinity come back as null
    except TypeError as exc:  # integers beyond 64 bits, objects orjson cannot write
        raise ValueError(f"log entry data must be plain JSON: {exc}") from exc
    if not plain:
        raise ValueError("log entry data must be plain JSON (no NaN or Infinity)")
    if len(encoded) > MAX_DATA_BYTES:
        return {"truncated": True, "bytes": len(encoded)}
    return data


def _encode(entry: LogEntry) -> bytes:
    return entry.model_dump_json().encode() + b"\n"


def _lane(level: LogLevel) -> Lane:
    return "security" if level == "security" else "normal"


def _dropped_notice(count: int, total: int) -> LogEntry:
    return make_entry(
        "warning",
        f"{count} log entries dropped before upload (the spool was full, or they were unreadable)",
        category="spool",
        data={"dropped": count, "dropped_total": total},
    )


def _new_batch_id() -> str:
    return uuid.uuid4().hex


# --- what a batch may still take ---------------------------------------------------------------------


@dataclass
class _Budget:
    entries: int
    bytes: int
    taken: int = 0

    def admits(self, size: int) -> bool:
        # The first entry always fits: entries are bounded far below the batch limit.
        return self.entries > 0 and (self.taken == 0 or size <= self.bytes)

    def take(self, size: int) -> None:
        self.entries -= 1
        self.bytes -= size
        self.taken += 1


# --- the policy, common to both spools ---------------------------------------------------------------


class _Contents(ABC):
    """The spool's contents, as seen while holding its lock."""

    dropped: int
    """Entries dropped so far (spool full, unreadable, refused by the manager), ever."""
    reported: int
    """How many of those the manager has been told about."""
    pending: list[str]
    """Ids of the batches formed and not yet acknowledged, oldest first."""

    @abstractmethod
    def count(self, lane: Lane) -> int: ...

    @abstractmethod
    def push(self, lane: Lane, entry: LogEntry, line: bytes) -> None: ...

    @abstractmethod
    def drop(self, lane: Lane, count: int) -> int:
        """Forget up to `count` oldest entries of `lane`; returns how many."""

    @abstractmethod
    def take(self, lane: Lane, budget: _Budget) -> list[LogEntry]:
        """Remove and return the oldest entries of `lane` that fit in `budget`."""

    @abstractmethod
    def load_batch(self, batch_id: str) -> LogBatch: ...

    @abstractmethod
    def save_batch(self, batch: LogBatch) -> None:
        """Keep a batch's content (before its id goes into `pending`)."""

    @abstractmethod
    def forget_batch(self, batch_id: str) -> None:
        """Its id is no longer pending: its content may go."""


class LogSpool:
    """A bounded queue of log entries, on disk under `directory` (None: in memory, see `MemoryLogSpool`).

    Thread-safe, and shared with other processes through an flock: `policycast-agent log` appends to a
    running agent's spool. Every call reads the spool afresh under the lock, so nothing is cached that
    another process could have changed. Calls block on disk I/O (an append is an fsync): fine for an
    agent's own events; the fleet simulator uses memory spools.
    """

    def __init__(
        self,
        directory: Path | None,
        *,
        max_entries: int = 10_000,
        batch_size: int = 500,
        max_batch_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not 1 <= batch_size <= MAX_LOG_ENTRIES:
            raise ValueError(f"batch_size must be between 1 and {MAX_LOG_ENTRIES}")
        self.max_entries = max_entries
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.directory = Path(directory) if directory is not None else None
        self._listeners: list[SpoolListener] = []
        self._lock = threading.Lock()
        self._memory = _MemoryContents() if directory is None else None

    @contextlib.contextmanager
    def _open(self) -> Iterator[_Contents]:
        """The contents, locked until the context ends, and persisted then (unless it raised)."""
        with self._lock:
            if self._memory is not None:
                yield self._memory
                return
            assert self.directory is not None
            self.directory.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, _FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
                contents = _FileContents(self.directory)
                yield contents
                contents.commit()
            finally:
                os.close(fd)

    def append(
        self, level: str, message: str, *, category: str = "agent", data: dict[str, Any] | None = None
    ) -> LogEntry:
        """Keep an entry (durably, for `LogSpool`) until uploaded; raises ValueError for a bad entry."""
        entry = make_entry(level, message, category=category, data=data)
        with self._open() as contents:
            contents.push(_lane(entry.level), entry, _encode(entry))
            self._enforce_bound(contents)
        for listener in list(self._listeners):
            listener(entry)
        return entry

    def next_batch(self) -> LogBatch | None:
        """The oldest batch not yet acknowledged, or a new one (security entries first); None: empty."""
        with self._open() as contents:
            if contents.pending:
                return contents.load_batch(contents.pending[0])
            batch = self._form(contents)
            if batch is not None:
                contents.save_batch(batch)
                contents.pending.append(batch.batch_id)
            return batch

    def acknowledge(self, batch_id: str) -> None:
        """The manager stored the batch: forget exactly its entries (an unknown id is ignored)."""
        with self._open() as contents:
            if batch_id in contents.pending:
                contents.pending.remove(batch_id)
                contents.forget_batch(batch_id)

    def refused(self, batch_id: str) -> None:
        """The manager refused the batch as too large (413; so it stored nothing): split it.

        Halves are new batches (new ids; safe, since none of it was stored), and later batches are
        no larger; a single entry refused is dropped, so no batch can hold the heartbeats back forever.
        """
        with self._open() as contents:
            if batch_id not in contents.pending:
                return
            batch = contents.load_batch(batch_id)
            halves = _split(batch)
            for half in halves:
                contents.save_batch(half)
            at = contents.pending.index(batch_id)
            contents.pending[at : at + 1] = [half.batch_id for half in halves]
            contents.forget_batch(batch_id)
            if halves:
                self.batch_size = min(self.batch_size, len(halves[0].entries))
                log.warning("the manager refused a log batch as too large; sending it in halves")
            else:
                contents.dropped += 1
                log.warning("dropped a log entry that the manager refuses as too large")

    def urgent(self) -> bool:
        """Whether a security entry waits for upload (queued or in a batch not yet acknowledged)."""
        with self._open() as contents:
            if contents.count("security"):
                return True
            return any(
                entry.level == "security"
                for batch_id in contents.pending
                for entry in contents.load_batch(batch_id).entries
            )

    @property
    def dropped(self) -> int:
        """Entries dropped so far, ever (persisted by `LogSpool`)."""
        with self._open() as contents:
            return contents.dropped

    def count(self) -> int:
        """Entries held: queued, plus those in batches not yet acknowledged."""
        with self._open() as contents:
            queued = sum(contents.count(lane) for lane in UPLOAD_ORDER)
            return queued + sum(len(contents.load_batch(b).entries) for b in contents.pending)

    def add_listener(self, listener: SpoolListener) -> Callable[[], None]:
        """Call `listener` after each append made through this object (not those of other processes)."""
        self._listeners.append(listener)
        return lambda: self._remove_listener(listener)

    def _remove_listener(self, listener: SpoolListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    # --- internals ---------------------------------------------------------------------------------

    def _enforce_bound(self, contents: _Contents) -> None:
        excess = sum(contents.count(lane) for lane in UPLOAD_ORDER) - self.max_entries
        for lane in DROP_ORDER:
            if excess <= 0:
                return
            dropped = contents.drop(lane, excess)
            contents.dropped += dropped
            excess -= dropped

    def _form(self, contents: _Contents) -> LogBatch | None:
        # A slot is kept for the report of dropped entries, so that the batch stays within batch_size.
        reserve = 1 if contents.dropped > contents.reported else 0
        budget = _Budget(entries=self.batch_size - reserve, bytes=self.max_batch_bytes)
        entries: list[LogEntry] = []
        for lane in UPLOAD_ORDER:
            entries += contents.take(lane, budget)
        # Checked after taking: unreadable lines found on the way count as dropped too.
        unreported = contents.dropped - contents.reported
        if unreported > 0 and len(entries) < self.batch_size:
            entries.insert(0, _dropped_notice(unreported, contents.dropped))
            contents.reported = contents.dropped
        if not entries:
            return None
        return LogBatch(batch_id=_new_batch_id(), entries=entries)


def _split(batch: LogBatch) -> list[LogBatch]:
    if len(batch.entries) < 2:
        return []
    half = len(batch.entries) // 2
    return [
        LogBatch(batch_id=_new_batch_id(), entries=batch.entries[:half]),
        LogBatch(batch_id=_new_batch_id(), entries=batch.entries[half:]),
    ]


class MemoryLogSpool(LogSpool):
    """A `LogSpool` without a disk: the same behaviour, gone with the process (tests, fleet simulator)."""

    def __init__(
        self, *, max_entries: int = 10_000, batch_size: int = 500, max_batch_bytes: int = MAX_BATCH_BYTES
    ) -> None:
        super().__init__(
            None, max_entries=max_entries, batch_size=batch_size, max_batch_bytes=max_batch_bytes
        )


# --- in memory ---------------------------------------------------------------------------------------


class _MemoryContents(_Contents):
    def __init__(self) -> None:
        self.dropped = 0
        self.reported = 0
        self.pending = []
        self._lanes: dict[Lane, deque[tuple[LogEntry, int]]] = {lane: deque() for lane in UPLOAD_ORDER}
        self._batches: dict[str, LogBatch] = {}

    def count(self, lane: Lane) -> int:
        return len(self._lanes[lane])

    def push(self, lane: Lane, entry: LogEntry, line: bytes) -> None:
        self._lanes[lane].append((entry, len(line)))

    def drop(self, lane: Lane, count: int) -> int:
        queue = self._lanes[lane]
        count = min(count, len(queue))
        for _ in range(count):
            queue.popleft()
        return count

    def take(self, lane: Lane, budget: _Budget) -> list[LogEntry]:
        queue = self._lanes[lane]
        taken: list[LogEntry] = []
        while queue and budget.admits(queue[0][1]):
            entry, size = queue.popleft()
            budget.take(size)
            taken.append(entry)
        return taken

    def load_batch(self, batch_id: str) -> LogBatch:
        return self._batches[batch_id]

    def save_batch(self, batch: LogBatch) -> None:
        self._batches[batch.batch_id] = batch

    def forget_batch(self, batch_id: str) -> None:
        self._batches.pop(batch_id, None)


# --- on disk -----------------------------------------------------------------------------------------


class _FileContents(_Contents):
    """The spool directory, read when the lock is taken; `commit` writes what changed."""

    def __init__(self, root: Path) -> None:
        self._root = root
        state = _load_state(root / STATE_FILE)
        heads = state.get("heads") or {}
        self._lanes = {lane: _SegmentLane(root / lane, int(heads.get(lane, 0))) for lane in UPLOAD_ORDER}
        self.dropped = int(state.get("dropped", 0))
        self.reported = int(state.get("reported", 0))
        self.pending = [str(batch_id) for batch_id in state.get("pending", [])]
        self._saved = self._state()
        self._forgotten: list[str] = []

    def count(self, lane: Lane) -> int:
        return self._lanes[lane].count

    def push(self, lane: Lane, entry: LogEntry, line: bytes) -> None:
        self._lanes[lane].push(line)

    def drop(self, lane: Lane, count: int) -> int:
        return self._lanes[lane].drop(count)

    def take(self, lane: Lane, budget: _Budget) -> list[LogEntry]:
        entries, lost = self._lanes[lane].take(budget)
        if lost:
            log.warning("the log spool lost %d unreadable entries in %s", lost, self._root / lane)
            self.dropped += lost
        return entries

    def load_batch(self, batch_id: str) -> LogBatch:
        try:
            return LogBatch.model_validate_json(self._batch_path(batch_id).read_bytes())
        except (OSError, ValidationError) as exc:
            # Only by outside damage; an empty batch under the same id keeps the spool moving.
            log.error("log batch %s is unreadable, its entries are lost: %s", batch_id, exc)
            return LogBatch(batch_id=batch_id, entries=[])

    def save_batch(self, batch: LogBatch) -> None:
        _write_atomic(self._batch_path(batch.batch_id), batch.model_dump_json().encode())

    def forget_batch(self, batch_id: str) -> None:
        self._forgotten.append(batch_id)

    def commit(self) -> None:
        state = self._state()
        if state != self._saved:
            _write_atomic(self._root / STATE_FILE, orjson.dumps(state))
        # Only once state.json no longer names them: a crash before this leaves harmless orphans.
        for batch_id in self._forgotten:
            with contextlib.suppress(FileNotFoundError):
                self._batch_path(batch_id).unlink()
        for lane in self._lanes.values():
            lane.remove_consumed()

    def _state(self) -> dict[str, Any]:
        return {
            "heads": {lane: segments.head for lane, segments in self._lanes.items()},
            "dropped": self.dropped,
            "reported": self.reported,
            "pending": list(self.pending),
        }

    def _batch_path(self, batch_id: str) -> Path:
        return self._root / BATCHES_DIR / f"{batch_id}.json"


class _SegmentLane:
    """One lane: segments of JSON lines; entry n is line n - first of the segment named first <= n.

    `head` is the sequence number of the oldest entry still queued (persisted in state.json).
    """

    def __init__(self, directory: Path, head: int) -> None:
        self.directory = directory
        self.head = head
        self._segments = _segment_names(directory)
        self._tail: int | None = None  # complete lines of the last segment, read when first needed

    @property
    def end(self) -> int:
        """The sequence number the next entry gets."""
        if not self._segments:
            return self.head
        return max(self.head, self._segments[-1] + self._tail_lines())

    @property
    def count(self) -> int:
        return self.end - self.head

    def push(self, line: bytes) -> None:
        append_durably(self._path(self._writable_segment()), line, mode=_FILE_MODE)
        self._tail = self._tail_lines() + 1

    def drop(self, count: int) -> int:
        count = max(0, min(count, self.count))
        self.head += count
        return count

    def take(self, budget: _Budget) -> tuple[list[LogEntry], int]:
        """The oldest entries that fit, and how many unreadable ones were passed over."""
        entries: list[LogEntry] = []
        lost = 0
        for index, first in enumerate(self._segments):
            end = self._segment_end(index)
            if end <= self.head:
                continue
            if self.head < first:  # a segment went missing: its entries are lost
                lost += first - self.head
                self.head = first
            lines = self._path(first).read_bytes().split(b"\n")[: end - first]
            for line in lines[self.head - first :]:
                if not budget.admits(len(line) + 1):
                    return entries, lost
                budget.take(len(line) + 1)
                self.head += 1
                entry = _decode(line)
                if entry is None:
                    lost += 1
                else:
                    entries.append(entry)
            if self.head < end:  # the segment is shorter than the next one's name says
                lost += end - self.head
                self.head = end
        return entries, lost

    def remove_consumed(self) -> None:
        """Delete the segments whose every entry is behind the head (uploaded or dropped)."""
        while self._segments and self._segment_end(0) <= self.head:
            with contextlib.suppress(FileNotFoundError):
                self._path(self._segments[0]).unlink()
            self._segments.pop(0)
            if not self._segments:
                self._tail = None

    # --- internals ---------------------------------------------------------------------------------

    def _path(self, first: int) -> Path:
        return self.directory / f"{first:016d}.jsonl"

    def _segment_end(self, index: int) -> int:
        if index + 1 < len(self._segments):
            return self._segments[index + 1]
        return self._segments[index] + self._tail_lines()

    def _tail_lines(self) -> int:
        if self._tail is None:
            self._tail = self._repair_tail() if self._segments else 0
        return self._tail

    def _repair_tail(self) -> int:
        """Cut a torn last line (a crash mid-append; the lock is held); returns the complete lines."""
        path = self._path(self._segments[-1])
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning("cutting a torn log entry off %s", path)
            os.truncate(path, complete)
        return data.count(b"\n", 0, complete)

    def _writable_segment(self) -> int:
        """The segment to append to: the last one, unless full or behind the head; else a new one."""
        if self._segments:
            last = self._segments[-1]
            lines = self._tail_lines()
            small = lines < SEGMENT_ENTRIES and self._path(last).stat().st_size < SEGMENT_BYTES
            if small and last + lines >= self.head:
                return last
        first = self.end
        self.directory.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
        os.close(os.open(self._path(first), os.O_WRONLY | os.O_CREAT, _FILE_MODE))
        fsync_dir(self.directory)  # the new name survives a power loss
        self._segments.append(first)
        self._tail = 0
        return first


def _segment_names(directory: Path) -> list[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(name[:-6]) for name in names if name.endswith(".jsonl") and name[:-6].isdigit())


def _decode(line: bytes) -> LogEntry | None:
    try:
        return LogEntry.model_validate_json(line)
    except ValidationError:
        return None


def _load_state(path: Path) -> dict[str, Any]:
    try:
        state = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as exc:
        # Only by outside damage (it is replaced atomically). Starting over resends what is on disk,
        # under new ids: duplicates rather than losses.
        log.error("ignoring the unreadable %s: %s", path, exc)
        return {}
    return state if isinstance(state, dict) else {}


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` so that a reader (or a crash) sees the old bytes or the new ones."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
    write_atomically(path, data, mode=_FILE_MODE)


# --- the pull loop's uploads, with the fast path for security entries --------------------------------


class LogUploads:
    """The pull loop's `uploads`: batches from a spool; a security entry brings the heartbeat forward.

    A security entry appended through this spool, or announced by `notice()` (which SIGUSR2 calls when
    `policycast-agent log` appended one from another process), leads to `update_now()` after
    min(GATHER_S, priority_delay_s): the entries of one incident travel together, and always within
    priority_delay_s. The spool is looked at again when the loop starts and after each acknowledged
    batch (a batch formed earlier may have gone first). Spool errors never fail a heartbeat.
    """

    def __init__(
        self, spool: LogSpool, update_now: Callable[[], None], *, priority_delay_s: float = PRIORITY_DELAY_S
    ) -> None:
        if priority_delay_s <= 0:
            raise ValueError("priority_delay_s must be positive")
        self.spool = spool
        self.gather_s = min(GATHER_S, priority_delay_s)
        self.priority_uploads = 0
        """Heartbeats brought forward for security entries (for tests and the simulator's counters)."""
        self._update_now = update_now
        self._wanted = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        spool.add_listener(self._on_append)

    def next_batch(self) -> LogBatch | None:
        try:
            return self.spool.next_batch()
        except Exception:
            log.exception("cannot read the log spool; heartbeat without logs")
            return None

    def acknowledge(self, batch_id: str) -> None:
        try:
            self.spool.acknowledge(batch_id)
            urgent = self.spool.urgent()
        except Exception:
            log.exception("cannot update the log spool")
            return
        if urgent:
            self.notice()

    def refused(self, batch_id: str) -> None:
        try:
            self.spool.refused(batch_id)
        except Exception:
            log.exception("cannot update the log spool")

    def notice(self) -> None:
        """A security entry waits: upload soon. Safe from a signal handler and from any thread."""
        loop = self._loop
        if loop is None:
            return  # not running: `run` looks at the spool when it starts
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            self._wanted.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._wanted.set)

    async def run(self, stop: asyncio.Event) -> None:
        """Bring heartbeats forward for security entries until `stop` is set."""
        # Made here: an asyncio.Event binds to the first loop that waits on it.
        self._wanted = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        try:
            if self._urgent():
                self._wanted.set()
            while await _before_stop(self._wanted.wait(), stop):
                # Entries of one incident come in a burst: let them gather into one upload.
                if not await _before_stop(asyncio.sleep(self.gather_s), stop):
                    return
                self._wanted.clear()
                self.priority_uploads += 1
                self._update_now()
        finally:
            self._loop = None

    def _on_append(self, entry: LogEntry) -> None:
        if entry.level == "security":
            self.notice()

    def _urgent(self) -> bool:
        try:
            return self.spool.urgent()
        except Exception:
            log.exception("cannot read the log spool")
            return False


async def _before_stop(work: Awaitable[Any], stop: asyncio.Event) -> bool:
    """Await `work` unless `stop` is set first; True if `work` finished and `stop` is not set."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        stopped.cancel()
    return task.done() and not task.cancelled() and not stop.is_set()


# --- the agent's own events --------------------------------------------------------------------------


def record_outcome(spool: LogSpool, outcome: ApplyOutcome) -> None:
    """Log an offered document's fate: applied (info), rejected (security), not stored (error).

    Stale offers are routine (retained MQTT messages, repeated heartbeats) and not logged.
    """
    if outcome.status is Outcome.APPLIED and outcome.document is not None:
        doc = outcome.document
        data = {"serial": doc.serial, "source": outcome.source, "group_id": doc.group_id}
        data["location_id"] = doc.location_id
        _record(spool, "info", f"applied serial {doc.serial} from {outcome.source}", "policy", data)
    elif outcome.status is Outcome.REJECTED:
        reason = outcome.reason or "rejected"
        # A document that failed verification (signature, form, group) is forged or broken in transit:
        # a security event. One the agent could not store is the host's problem, not an attack.
        local = reason.startswith("not stored")
        level = "error" if local else "security"
        data = {"source": outcome.source, "reason": reason, "serial": outcome.serial}
        _record(spool, level, f"rejected a document from {outcome.source}: {reason}", "security", data)


def record_reachability(spool: LogSpool, reachable: bool, detail: str) -> None:
    """Log that the manager became unreachable (warning) or reachable again (info)."""
    _record(spool, "info" if reachable else "warning", detail, "manager", {"reachable": reachable})


def _record(spool: LogSpool, level: str, message: str, category: str, data: dict[str, Any]) -> None:
    try:
        spool.append(level, message, category=category, data=data)
    except (OSError, ValueError) as exc:
        # The agent's work goes on without its log rather than stop for it.
        log.warning("could not log %r to the spool: %s", message, exc)
