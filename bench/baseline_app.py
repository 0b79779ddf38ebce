"""The baselines of benchmark 2, served by uvicorn exactly as the manager is.

- `create` (`uvicorn --factory bench.baseline_app:create`): the *FastAPI floor*, a minimal FastAPI
  endpoint at the heartbeat's path that takes the same JSON body (the same `HeartbeatRequest` model, so
  the same validation) and returns a small JSON. No authentication, no state: what FastAPI costs alone.
- `asgi_floor` (`uvicorn bench.baseline_app:asgi_floor`): the *raw ASGI floor*, no framework at all: read
  the body, parse it with orjson, answer a constant. What uvicorn and httptools cost alone.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from fabric_core.wire import HeartbeatRequest

PATH = "/agent/v1/heartbeat"


def create() -> FastAPI:
    app = FastAPI(title="benchmark 2 baseline")

    @app.post(PATH)
    async def heartbeat(body: HeartbeatRequest) -> dict[str, Any]:
        return {"changed": False, "serial": body.serial, "next_heartbeat_s": 300}

    return app


_JSON = (b"content-type", b"application/json")


async def asgi_floor(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    serial = orjson.loads(body)["serial"]
    payload = b'{"changed":false,"serial":%d,"next_heartbeat_s":300}' % serial
    headers = [(b"content-length", str(len(payload)).encode()), _JSON]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
