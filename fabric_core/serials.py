"""The serial rule: one global, strictly increasing counter orders every effective document.

The manager hands out serials from a single counter in the same transaction that changes a document, so
a larger serial always means a later state, and a serial names exactly one version of one document. Push
and pull deliver the same documents with the same serials, so one comparison deduplicates both channels.

Anti-rollback is kept per (group, location): an agent applies a document only if its serial is strictly
greater than the highest it has applied for that same (group, location). When the agent moves to another
(group, location), the document it receives may carry a lower serial than the one it holds (the other
location simply changed less recently); it is accepted if it is not older than the last one the agent
applied there, because a serial equal to that high-water mark is that very document, not a rollback.
"""

from __future__ import annotations

from collections.abc import Mapping

from fabric_core.errors import StaleSerial

NO_SERIAL = 0
"""What an agent holds before it has applied any document."""

SERIAL_MAX = 2**63 - 1
"""The largest serial: the manager stores serials as signed 64-bit integers (BIGINT)."""

DocumentKey = tuple[int, int]
"""(group_id, location_id): the identity of one effective document."""


def is_newer(offered: int, held: int) -> bool:
    return offered > held


def require_newer(offered: int, held: int) -> None:
    """Raise `StaleSerial` unless `offered` may replace `held` for the same document."""
    if not is_newer(offered, held):
        raise StaleSerial(offered, held)


def require_applicable(
    *,
    offered: int,
    offered_key: DocumentKey,
    current_key: DocumentKey | None,
    high_water: Mapping[DocumentKey, int],
) -> None:
    """Raise `StaleSerial` unless a document may be applied under the per-(group, location) rule."""
    mark = high_water.get(offered_key, NO_SERIAL)
    if offered <= NO_SERIAL:
        raise StaleSerial(offered, mark)
    if offered_key == current_key:
        require_newer(offered, mark)
    elif offered < mark:
        raise StaleSerial(offered, mark)
