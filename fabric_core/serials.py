"""The serial rule: one global, strictly increasing counter orders every effective document.

The manager hands out serials from a single counter in the same transaction that changes a document, so
a larger serial always means a later state. An agent applies a document only if its serial is strictly
greater than the one it holds, whatever its group, location or transport (anti-rollback).
"""

from __future__ import annotations

from fabric_core.errors import StaleSerial

NO_SERIAL = 0
"""What an agent holds before it has applied any document."""


def is_newer(offered: int, held: int) -> bool:
    return offered > held


def require_newer(offered: int, held: int) -> None:
    """Raise `StaleSerial` unless `offered` may replace `held`."""
    if not is_newer(offered, held):
        raise StaleSerial(offered, held)
