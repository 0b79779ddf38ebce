"""The one shape of every error answer, and the handlers that make sure nothing answers in another.

Every error of both APIs is `{"detail": str}`: one line saying why. A request that fails validation
(422) carries in addition `errors`, one item per refused value, `{loc, msg, type}` as pydantic reports
them, without the refused input: echoing input back is how a lone surrogate crashed FastAPI's own 422
handler (it cannot be encoded), and an error answer has no business repeating a secret a client put in
the wrong field. Strings in the answer are made encodable (`\\udXXX` written out) whatever they hold.

The database handlers are a safety net: every integer and string of a request is bounded in its model
before it reaches SQL; one that slips through is still the client's bad input, a 422, not a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError

log = logging.getLogger(__name__)

SHOWN_ERRORS = 3
"""How many field errors the one-line `detail` names; `errors` lists them all."""


class FieldError(BaseModel):
    loc: list[str | int] = Field(
        description='where: e.g. ["body", "conditions", 0, "cidr"], ["query", "limit"]'
    )
    msg: str
    type: str = Field(description="pydantic's error type, e.g. missing, int_type, extra_forbidden")


class ErrorOut(BaseModel):
    """Every error answer of both APIs."""

    detail: str = Field(description="why the request was refused, in one line")
    errors: list[FieldError] | None = Field(
        default=None, description="request validation (422) only: every refused value"
    )


def encodable(text: str) -> str:
    """`text` with anything UTF-8 cannot carry (lone surrogates) written out as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def field_errors(raw: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """pydantic's (or FastAPI's) error dicts as `FieldError`s: loc, msg and type, nothing of the input."""
    errors = []
    for error in raw:
        msg = str(error.get("msg", "invalid"))
        context = error.get("ctx")
        if error.get("type") == "json_invalid" and isinstance(context, Mapping) and context.get("error"):
            msg = f"{msg}: {context['error']}"
        loc = [part if isinstance(part, int) else encodable(str(part)) for part in error.get("loc", ())]
        errors.append({"loc": loc, "msg": encodable(msg), "type": encodable(str(error.get("type", "")))})
    return errors


def summary(errors: Sequence[Mapping[str, Any]]) -> str:
    """One line naming the first refused values: `body.name: Field required; query.limit: ...`."""
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in errors[:SHOWN_ERRORS]]
    more = len(errors) - SHOWN_ERRORS
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "") if parts else "invalid request"


def validation_error(errors: list[dict[str, Any]]) -> JSONResponse:
    """The 422 answer for these field errors."""
    return JSONResponse({"detail": summary(errors), "errors": errors}, status_code=422)


async def _request_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error(field_errors(exc.errors()))


async def _data_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DataError)
    reason = str(exc.orig).splitlines()[0] if exc.orig is not None else "invalid value"
    log.warning(
        "%s %s: the database refused a value (a bound is missing): %s",
        request.method,
        request.url.path,
        reason,
    )
    return JSONResponse(
        {"detail": encodable(f"a value of the request does not fit the database: {reason}")}, status_code=422
    )


async def _overflow(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OverflowError)
    if "SQLite" not in str(exc):  # not the driver refusing an integer: a bug, and a 500
        raise exc
    log.warning(
        "%s %s: the database refused an integer (a bound is missing): %s",
        request.method,
        request.url.path,
        exc,
    )
    return JSONResponse(
        {"detail": "an integer of the request is out of range for the database"}, status_code=422
    )


def install_error_handlers(app: FastAPI) -> None:
    """Request validation in the one shape; database refusals of input as 422 (the safety net)."""
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(OverflowError, _overflow)
