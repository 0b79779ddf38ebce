"""What a heartbeat body must be: the route's storability checks, and the fast path's from the model.

The route parses the body with `HeartbeatRequest` (pydantic) and then refuses what the database could
not hold (`require_storable`). The fast path cannot afford pydantic, so it checks orjson's parse by
hand, with the field names, the modes and the serial bounds read off `HeartbeatRequest` itself: a
change to the model changes both doors.
"""

from __future__ import annotations

from typing import Any, get_args

from api.errors import Invalid
from fabric_core.canonical import MAX_JSON_DEPTH, PLAIN_JSON, is_plain_json
from fabric_core.wire import AnyId, HeartbeatRequest

_SERIAL = HeartbeatRequest.model_fields["serial"]
_EXPIRES = HeartbeatRequest.model_fields["mqtt_expires_at"]
FIELDS = frozenset(HeartbeatRequest.model_fields)
MODES = frozenset(get_args(HeartbeatRequest.model_fields["mode"].annotation))
SERIAL_MIN: int = next(bound.ge for bound in _SERIAL.metadata if hasattr(bound, "ge"))
SERIAL_MAX: int = next(bound.le for bound in _SERIAL.metadata if hasattr(bound, "le"))
EXPIRES_MIN: int = next(bound.ge for bound in _EXPIRES.metadata if hasattr(bound, "ge"))
EXPIRES_MAX: int = next(bound.le for bound in _EXPIRES.metadata if hasattr(bound, "le"))
_LOCATION = get_args(AnyId)[1]  # the Field of HeartbeatRequest.location_id's type
LOCATION_MIN: int = next(bound.ge for bound in _LOCATION.metadata if hasattr(bound, "ge"))
LOCATION_MAX: int = next(bound.le for bound in _LOCATION.metadata if hasattr(bound, "le"))
_MIN_INT = -(2**63)
_MAX_INT = 2**64 - 1  # what orjson, hence canonical JSON, can write


def require_storable(body: HeartbeatRequest) -> None:
    """Refuse what the database cannot hold: it would fail the batched bookkeeping of every agent."""
    if body.status is not None and not is_plain_json(body.status):
        raise Invalid(f"status must be {PLAIN_JSON}")
    if body.logs is not None:  # NUL in a message or a category: refused by the model (`Text`)
        for index, entry in enumerate(body.logs.entries):
            if entry.data is not None and not is_plain_json(entry.data):
                raise Invalid(f"log entry {index}: data must be {PLAIN_JSON}")


def everyday(request: Any) -> bool:
    """True if orjson's parse of a body is a heartbeat the route would take as it is, without logs.

    Strict types, as the model's: an int is an int (not a bool, a float or a string).
    """
    if type(request) is not dict or not FIELDS.issuperset(request) or request.get("logs") is not None:
        return False
    serial = request.get("serial")
    location_id = request.get("location_id")
    mode = request.get("mode")
    status = request.get("status")  # absent or null: unchanged, the manager keeps what it holds
    expires = request.get("mqtt_expires_at")
    return (
        type(serial) is int
        and SERIAL_MIN <= serial <= SERIAL_MAX
        and (
            location_id is None or (type(location_id) is int and LOCATION_MIN <= location_id <= LOCATION_MAX)
        )
        and type(mode) is str
        and mode in MODES
        and (status is None or (type(status) is dict and plain_without_floats(status)))
        and (expires is None or (type(expires) is int and EXPIRES_MIN <= expires <= EXPIRES_MAX))
    )


def plain_without_floats(value: Any, depth: int = 0) -> bool:
    """`is_plain_json` for what orjson parsed, without floats: orjson reads an integer beyond 64 bits
    as a float, where the route's parser keeps the integer and refuses it; so any float goes there."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(_MIN_INT <= value <= _MAX_INT)
    if depth >= MAX_JSON_DEPTH:  # this container would be one level too many
        return False
    if kind is dict:
        return all(plain_without_floats(item, depth + 1) for item in value.values())
    if kind is list:
        return all(plain_without_floats(item, depth + 1) for item in value)
    return False
