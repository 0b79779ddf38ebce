"""A console form's fields read one by one, each refused at its own field with the reason.

A page reads what it needs (`text`, `name`, `json`, `integer`), then acts only if `fields.ok`; otherwise
it shows the form again with `fields.values` (what the operator typed, so nothing is lost) and
`fields.errors` (field → message, which the templates' `_fields.html` macros put at the field with
`aria-invalid`, `aria-describedby` and a `role="alert"` paragraph). A service's refusal of what passed
these checks goes to a field too (`refuse`), so a refused input is always shown where it was typed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import FormData

from api.schemas import Name
from fabric_core.canonical import MAX_JSON_DEPTH
from fabric_core.text import text_problem

MAX_TEXT = 4096
"""Longest one-line field the console reads (a name, a filter); a longer one is refused, not cut."""
MAX_DOCUMENT = 512 * 1024
"""Longest JSON textarea (a policy body, conditions); the body limit of the app bounds it first anyway."""
_NAME = TypeAdapter(Name)


def pydantic_reason(error: ValidationError) -> str:
    """The first reason pydantic gives, in the words an operator reads ("Value error, " dropped)."""
    first = error.errors()[0]
    return str(first["msg"]).removeprefix("Value error, ")


class Fields:
    def __init__(self, form: FormData | Mapping[str, Any]) -> None:
        self._form = form
        self.values: dict[str, str] = {}
        self.errors: dict[str, str] = {}

    @property
    def ok(self) -> bool:
        return not self.errors

    def refuse(self, field: str, message: str) -> None:
        self.errors.setdefault(field, message)  # the first reason is the one to fix first

    def text(self, field: str, *, max_length: int = MAX_TEXT) -> str:
        """The field as typed ("" when absent, or a file where text was expected)."""
        value = self._form.get(field)
        text = value if isinstance(value, str) else ""
        self.values[field] = text
        if len(text) > max_length:
            self.refuse(field, f"is longer than {max_length} characters")
        problem = text_problem(text)
        if problem is not None:  # PostgreSQL's text cannot hold it, not even in a query's filter
            self.refuse(field, f"may not contain {problem}")
        return text

    def name(self, field: str) -> str | None:
        """A group, location or policy name by the admin API's rule (trimmed, 1-128, NFC, no control
        characters)."""
        text = self.text(field)
        try:
            return _NAME.validate_python(text)
        except ValidationError as refused:
            self.refuse(field, f"Name: {pydantic_reason(refused)}")
            return None

    def json(self, field: str, *, expect: type[dict[str, Any]] | type[list[Any]], what: str) -> Any:
        """The field parsed as JSON of the expected kind (an object or an array); None when refused, with
        the parser's line and column (`what` names the field in the message: "The policy body")."""
        text = self.text(field, max_length=MAX_DOCUMENT)
        if field in self.errors:
            return None
        problem, value = parse_json(text)
        if problem is None and not isinstance(value, expect):
            wanted, got = _json_kind(expect), _json_kind(type(value))
            problem = f"must be a JSON {wanted}, not {'an' if got[0] in 'aeiou' else 'a'} {got}"
        if problem is not None:
            self.refuse(field, f"{what} {problem}")
            return None
        return value

    def integer(self, field: str, *, low: int, high: int, what: str) -> int | None:
        """An optional whole number within [low, high]; None when empty or refused."""
        text = self.text(field, max_length=32).strip()
        if not text:
            return None
        # isdigit alone takes "²" and other digits int() refuses; ASCII digits only, and few of them,
        # so that no number beyond what a column holds reaches SQL.
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            self.refuse(field, f"{what} must be a whole number from {low} to {high}")
            return None
        number = int(text)
        if not low <= number <= high:
            self.refuse(field, f"{what} must be a whole number from {low} to {high}")
            return None
        return number

    def moment(self, field: str, *, what: str) -> datetime | None:
        """An optional moment, ISO 8601 as a datetime-local field sends it ("2024-05-01T08:00"); without
        an offset it is UTC (the page says so). None when empty or refused."""
        text = self.text(field, max_length=64).strip()
        if not text:
            return None
        try:
            parsed = datetime.fromisoformat(text)
            return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except (ValueError, OverflowError):  # OverflowError: year 1 with a positive offset, and the like
            self.refuse(field, f"{what} must be a date and time such as 2024-05-01T08:00 (UTC)")
            return None


def parse_json(text: str) -> tuple[str | None, Any]:
    """(None, the value) or (why not, None): the parser's message with its line and column. What
    canonical JSON cannot hold (NaN, Infinity, nesting too deep) is refused here too; what it can hold
    but the manager cannot store (integers beyond 64 bits, lone surrogates) is the services' to refuse."""
    if not text.strip():
        return "is empty: type a JSON document", None

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        value = json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as bad:
        return f"is not valid JSON: {bad.msg} at line {bad.lineno}, column {bad.colno}", None
    except ValueError as bad:  # parse_constant's refusal
        return f"is not valid JSON: {bad}", None
    except RecursionError:
        return f"is nested more than {MAX_JSON_DEPTH} levels deep", None
    return None, value


def _json_kind(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        kind, "number"
    )


def pretty_json(value: Any) -> str:
    """A document as the textarea shows it: indented, keys in the order they are stored."""
    return json.dumps(value, indent=2, ensure_ascii=False)
