"""The pull loop's log uploads, with the fast path for security entries (SEPM's).

`LogUploads` plugs a `LogSpool` into the pull loop as its `uploads`: each heartbeat carries the spool's
next batch, an acknowledged batch is forgotten, one refused as too large is split. A security entry
brings the next heartbeat forward, so that it reaches the manager within `priority_delay_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from agent_stub.log_spool import LogSpool
from fabric_core.wire import LogBatch, LogEntry

log = logging.getLogger(__name__)

PRIORITY_DELAY_S = 60.0
GATHER_S = 5.0


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
