"""The log spool's contents: where its entries wait, in memory or on disk, as seen under its lock.

`LogSpool` (`agent_stub.log_spool`) holds the policy (the bound, batches, exactly once); this module
holds the two ways of keeping what it decides: `MemoryContents` (deques and a dict) and `FileContents`,
the spool directory:

    security/, normal/    two lanes of append-only JSON-lines segments named by their first sequence
                          number (`0000000000000256.jsonl`); a `SegmentLane` each
    state.json            how far each lane is consumed, the dropped counters and the ids of the
                          batches formed but not yet acknowledged (replaced atomically)
    batches/<id>.json     the content of each such batch

An append is one write and one fsync on a segment that is already there (`files.append_durably`); a
new segment's name is made durable with a directory fsync. A torn last line (a crash mid-write) is cut
off by the next append, which holds the lock, so readers only ever see complete lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from agent_stub.files import append_durably, fsync_dir, write_atomically
from fabric_core.wire import LogBatch, LogEntry

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
BATCHES_DIR = "batches"
SEGMENT_ENTRIES = 256
SEGMENT_BYTES = 256 * 1024
DIR_MODE = 0o700
FILE_MODE = 0o600

Lane = Literal["security", "normal"]
UPLOAD_ORDER: tuple[Lane, ...] = ("security", "normal")
"""Security entries are uploaded first."""


# --- what a batch may still take ---------------------------------------------------------------------


@dataclass
class Budget:
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


class Contents(ABC):
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
    def take(self, lane: Lane, budget: Budget) -> list[LogEntry]:
        """Remove and return the oldest entries of `lane` that fit in `budget`."""

    @abstractmethod
    def load_batch(self, batch_id: str) -> LogBatch: ...

    @abstractmethod
    def save_batch(self, batch: LogBatch) -> None:
        """Keep a batch's content (before its id goes into `pending`)."""

    @abstractmethod
    def forget_batch(self, batch_id: str) -> None:
        """Its id is no longer pending: its content may go."""


# --- in memory ---------------------------------------------------------------------------------------


class MemoryContents(Contents):
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

    def take(self, lane: Lane, budget: Budget) -> list[LogEntry]:
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


class FileContents(Contents):
    """The spool directory, read when the lock is taken; `commit` writes what changed."""

    def __init__(self, root: Path) -> None:
        self._root = root
        state = _load_state(root / STATE_FILE)
        heads = state.get("heads") or {}
        self._lanes = {lane: SegmentLane(root / lane, int(heads.get(lane, 0))) for lane in UPLOAD_ORDER}
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

    def take(self, lane: Lane, budget: Budget) -> list[LogEntry]:
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
        _replace_file(self._batch_path(batch.batch_id), batch.model_dump_json().encode())

    def forget_batch(self, batch_id: str) -> None:
        self._forgotten.append(batch_id)

    def commit(self) -> None:
        state = self._state()
        if state != self._saved:
            _replace_file(self._root / STATE_FILE, orjson.dumps(state))
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


class SegmentLane:
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
        append_durably(self._path(self._writable_segment()), line, mode=FILE_MODE)
        self._tail = self._tail_lines() + 1

    def drop(self, count: int) -> int:
        count = max(0, min(count, self.count))
        self.head += count
        return count

    def take(self, budget: Budget) -> tuple[list[LogEntry], int]:
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
        self.directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        os.close(os.open(self._path(first), os.O_WRONLY | os.O_CREAT, FILE_MODE))
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


def _replace_file(path: Path, data: bytes) -> None:
    """Replace `path` so that a reader (or a crash) sees the old bytes or the new ones."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    write_atomically(path, data, mode=FILE_MODE)
