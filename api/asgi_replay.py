"""`replay`: hand an ASGI app a request body that a middleware has already read.

The middlewares in front of the routes (the heartbeat fast path, `JsonBodies`) read the body to decide;
when they let the request through, the app must still receive it, followed by whatever the client sends
after it.
"""

from __future__ import annotations

from starlette.types import Message, Receive


def replay(body: bytes, pending: Message | None, receive: Receive) -> Receive:
    """A `receive` that gives the app `body` first (then `pending`, a message read past it, if any),
    then whatever comes next."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent, pending
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": pending is not None}
        if pending is not None:
            message, pending = pending, None
            return message
        return await receive()

    return replayed
