"""`JsonBodies`: an ASGI layer that refuses a JSON request body orjson would not accept, with 422.

FastAPI parses bodies with Python's `json`, which takes what canonical JSON, PostgreSQL and most other
parsers refuse: lone surrogates (`"\\ud800"`), NaN and Infinity, and nesting deep enough to exhaust the
interpreter's recursion. orjson, which the manager signs and stores with and the heartbeat's fast path
parses with, refuses all of them. This layer checks every JSON body with orjson before FastAPI sees it,
so that a body is JSON by one definition on every route, and hands the body on untouched (FastAPI then
parses it as before, keeping integers beyond 64 bits exact, for the models to refuse).

It checks `POST`, `PUT` and `PATCH` bodies whose content type is JSON (`application/json`,
`*/*+json`) or absent (FastAPI parses those as JSON too), except under the `exempt` prefixes (raw
uploads, which may be any bytes and far larger). It sits inside `BodyLimit`, so it never buffers more
than the body limit.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from api.asgi_replay import replay
from api.error_responses import validation_error

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class JsonBodies:
    """Refuse JSON bodies orjson cannot parse with 422; pass every other request on as it came."""

    def __init__(self, app: ASGIApp, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in BODY_METHODS
            or scope["path"].startswith(self.exempt)
            or not _is_json(next((v for k, v in scope["headers"] if k == b"content-type"), None))
        ):
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                await self.app(scope, replay(body, message, receive), send)
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        if body:
            try:
                orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                error = {"loc": ["body"], "msg": _reason(body, exc), "type": "json_invalid"}
                await validation_error([error])(scope, receive, send)
                return
        await self.app(scope, replay(body, None, receive), send)


def _reason(body: bytes, exc: orjson.JSONDecodeError) -> str:
    """What orjson refused, in words that name it."""
    at = f"at character {exc.pos}"
    if body[exc.pos : exc.pos + 3] == b"NaN" or body[exc.pos : exc.pos + 8] == b"Infinity":
        return f"NaN and Infinity are not JSON numbers ({at})"
    if "surrogate" in exc.msg and "UTF-8" not in exc.msg:
        return f"a string holds a lone surrogate (\\ud800 to \\udfff), which is not text ({at})"
    if "depth" in exc.msg:
        return f"JSON nested more than 1024 levels deep ({at})"
    return f"JSON decode error {at}: {exc.msg}"
