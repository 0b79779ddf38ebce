"""Waiting on events in tests: one way to poll for a condition, for threads and for asyncio alike.

A test waits for what must happen (a row written, a message received, a process ready), never for a
fixed time. `timeout` only bounds a failure, so it is generous; the test is as fast as the event.

- `wait_for(check, timeout=..., what=...)`: call `check` until it returns something truthy and return
  that; or, with `until`, until `until(value)` holds for what `check` returned, and return the value.
- `wait_for_async(...)`: the same inside a running event loop (the loop keeps running meanwhile).

`what` says what was awaited; it may be a callable (e.g. a process's log), called only on failure so
that the message shows the state at the deadline. The last value `check` returned is in the message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

T = TypeVar("T")
Description = str | Callable[[], str]
Falsy = None | Literal[False]


def _timed_out(timeout: float, what: Description, last: Any) -> AssertionError:
    described = what() if callable(what) else what
    return AssertionError(f"timed out after {timeout:.1f}s waiting for {described}\n(last seen: {last!r})")


def _done(value: Any, until: Callable[[Any], bool] | None) -> bool:
    return bool(until(value)) if until is not None else bool(value)


@overload
def wait_for(
    check: Callable[[], T | Falsy], *, timeout: float, what: Description, interval: float = ...
) -> T: ...
@overload
def wait_for(
    check: Callable[[], T],
    *,
    timeout: float,
    what: Description,
    interval: float = ...,
    until: Callable[[T], bool],
) -> T: ...
def wait_for(
    check: Callable[[], Any],
    *,
    timeout: float,
    what: Description,
    interval: float = 0.05,
    until: Callable[[Any], bool] | None = None,
) -> Any:
    """Poll `check` every `interval` s until its value is truthy (or `until(value)` holds); return it.

    Fails with `what` and the last value after `timeout` seconds. `check` is called at least once, and
    once more at the deadline; an exception it raises ends the wait at once (e.g. a process that died).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if _done(value, until):
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, value)
        time.sleep(min(interval, max(deadline - time.monotonic(), 0.0)))


@overload
async def wait_for_async(
    check: Callable[[], T | Falsy],
    *,
    timeout: float,  # noqa: ASYNC109
    what: Description,
    interval: float = ...,
) -> T: ...
@overload
async def wait_for_async(
    check: Callable[[], T],
    *,
    timeout: float,  # noqa: ASYNC109
    what: Description,
    interval: float = ...,
    until: Callable[[T], bool],
) -> T: ...
async def wait_for_async(
    check: Callable[[], Any],
    *,
    timeout: float,  # noqa: ASYNC109  (the same keyword as wait_for's; the poll yields at every step)
    what: Description,
    interval: float = 0.005,
    until: Callable[[Any], bool] | None = None,
) -> Any:
    """`wait_for` inside a running event loop: `check` is a plain (synchronous) callable, polled
    between `asyncio.sleep(interval)`s so that the tasks under test run meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if _done(value, until):
            return value
        if loop.time() >= deadline:
            raise _timed_out(timeout, what, value)
        await asyncio.sleep(min(interval, max(deadline - loop.time(), 0.0)))
