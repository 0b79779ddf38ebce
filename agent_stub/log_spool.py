"""The agent's log spool: entries wait on disk until a heartbeat has uploaded them (DESIGN.md §5, §6).

Layout, under `<state_dir>/spool/` (0700; files 0600):

    .lock                 flock'd around every operation, by the agent and by `policycast-agent log`
    security/, normal/    two lanes of append-only JSON-lines segments named by their first sequence
                          number (`0000000000000256.jsonl`); security entries are uploaded first
    state.json            how far each lane is consumed, the dropped counters and the ids of the
                          batches formed but not yet acknowledged (replaced atomically)
    batches/<id>.json     the content of each such batch

This module holds the policy (`LogSpool`); `agent_stub.log_contents` keeps what it decides, on disk or
in memory. Why segments of JSON lines rather than one file per entry: an append is one `write` + `fsync`
on a file that is already there (a file per entry costs a create, an fsync, a rename and a directory
fsync, and a full spool of 10,000 entries would be 10,000 inodes). A torn last line (a crash mid-write)
is cut off by the next append, which holds the lock; readers only ever see complete lines.

Exactly once (DESIGN.md §6): a batch is written to `batches/` and named in `state.json` before it is
first handed out, and handed out again, with the same id, until it is acknowledged; the manager stores a
batch once per (agent, batch id). Batch ids are random (uuid4), so a re-created spool never reuses one
(a reused id would be silently dropped by the manager as a retry).

Bounded: at most `max_entries` entries wait besides the batches in flight; when full, the oldest
entries go first, ordinary ones before security ones. How many were dropped is persisted and reported
to the manager in the next batch, as an entry of category `spool` (level `warning`).

`MemoryLogSpool` is the same without a disk, for tests and the fleet simulator. `LogUploads`
(`agent_stub.log_uploads`) plugs a spool into the pull loop and schedules a heartbeat soon after a
security entry (SEPM's fast path).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from agent_stub.log_contents import (
    DIR_MODE,
    FILE_MODE,
    UPLOAD_ORDER,
    Budget,
    Contents,
    FileContents,
    Lane,
    MemoryContents,
)
from fabric_core.canonical import MAX_JSON_DEPTH, canonical_json, json_depth
from fabric_core.wire import MAX_LOG_ENTRIES, LogBatch, LogEntry, LogLevel

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"
LOCK_FILE = ".lock"

DROP_ORDER: tuple[Lane, ...] = ("normal", "security")
"""When the spool is full, ordinary entries go before security ones (each lane oldest first)."""

MAX_MESSAGE_CHARS = 4096  # LogEntry.message's limit
MAX_DATA_BYTES = 16 * 1024
MAX_BATCH_BYTES = 512 * 1024
"""Half the manager's default body limit (1 MiB), leaving room for the rest of the heartbeat."""

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
        return LogEntry.model_validate(  # a dict: `level` is validated here, not assumed
            {
                "ts": datetime.now(UTC),
                "level": level,
                "category": category.replace("\x00", "\ufffd"),
                "message": message,
                "data": _bounded_data(data),
            }
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
    if json_depth(data) > MAX_JSON_DEPTH:  # the manager would refuse the batch, and hold the rest back
        raise ValueError(f"log entry data may nest at most {MAX_JSON_DEPTH} levels")
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


# --- the policy, common to both spools ---------------------------------------------------------------


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
        self._memory = MemoryContents() if directory is None else None

    @contextlib.contextmanager
    def _open(self) -> Iterator[Contents]:
        """The contents, locked until the context ends, and persisted then (unless it raised)."""
        with self._lock:
            if self._memory is not None:
                yield self._memory
                return
            assert self.directory is not None
            self.directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
                contents = FileContents(self.directory)
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

    def _enforce_bound(self, contents: Contents) -> None:
        excess = sum(contents.count(lane) for lane in UPLOAD_ORDER) - self.max_entries
        for lane in DROP_ORDER:
            if excess <= 0:
                return
            dropped = contents.drop(lane, excess)
            contents.dropped += dropped
            excess -= dropped

    def _form(self, contents: Contents) -> LogBatch | None:
        # A slot is kept for the report of dropped entries, so that the batch stays within batch_size.
        reserve = 1 if contents.dropped > contents.reported else 0
        budget = Budget(entries=self.batch_size - reserve, bytes=self.max_batch_bytes)
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
