"""A small synchronous NATS-protocol client: the bridge's system-account connection.

The bridge needs two things of the NATS protocol: send a request (an account JWT on
`$SYS.REQ.CLAIMS.UPDATE`, a kick on `$SYS.REQ.SERVER.<id>.KICK`) and gather the answers, and
subscribe to system events (the takeover guard's `$SYS.ACCOUNT.<account>.CONNECT`) and read them
with a timeout (`subscribe`, `next_message`). Messages of a subscription that arrive while a request
waits for its answers are kept for `next_message`. That is a few lines of the text
protocol (INFO, CONNECT, PING/PONG, SUB, PUB, MSG/HMSG) over TLS, synchronous like the rest of the
bridge, rather than an asyncio client library and its event loop in a thread of a sync process.

The system user is not a bearer token: the client signs the server's nonce with the user's key.
Secrets (the JWT, the seed) are never logged.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import secrets
import socket
import ssl
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from broker_bridge.errors import BrokerUnavailable
from broker_bridge.nats.nkeys import KeyPair

log = logging.getLogger(__name__)

_CRLF = b"\r\n"
_MAX_LINE = 1 << 20


class NatsError(BrokerUnavailable):
    """The server refused (an -ERR), or no node answered."""


@dataclass(frozen=True, slots=True)
class Reply:
    subject: str
    payload: bytes
    status: int | None = None
    """The header status line's code (503: no responders), None without headers."""


class SystemClient:
    """One connection to one nats-server, as a user that signs nonces (the system user)."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket, server: dict[str, Any]) -> None:
        self._sock = sock
        self.server = server
        self._buffer = b""
        self._sid = 0
        self._pending: deque[Reply] = deque()
        """Subscription messages read while a request waited for its own answers."""

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        user_jwt: str,
        user_key: KeyPair,
        ssl_context: ssl.SSLContext | None,
        timeout: float = 5.0,
        name: str = "policycast-bridge-system",
    ) -> SystemClient:
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"NATS URL {url!r} must look like tls://host:port")
        host, port = parts.hostname, parts.port or 4222
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            info = cls._read_info(raw)
            sock: socket.socket | ssl.SSLSocket = raw
            if info.get("tls_required") or parts.scheme == "tls":
                if ssl_context is None:
                    raise NatsError(f"{url} requires TLS and no CA was given to verify it")
                sock = ssl_context.wrap_socket(raw, server_hostname=host)
            client = cls(sock, info)
            nonce = str(info.get("nonce", "")).encode()
            signature = base64.urlsafe_b64encode(user_key.sign(nonce)).decode().rstrip("=")
            options = {
                "verbose": False,
                "pedantic": False,
                "tls_required": isinstance(sock, ssl.SSLSocket),
                "jwt": user_jwt,
                "sig": signature,
                "name": name,
                "lang": "python-policycast",
                "version": "1",
                "protocol": 1,
                "headers": True,
                "no_responders": True,
            }
            client._send(b"CONNECT " + json.dumps(options).encode() + _CRLF + b"PING" + _CRLF)
            client._await_pong(time.monotonic() + timeout)
            return client
        except BaseException:
            raw.close()
            raise

    @staticmethod
    def _read_info(raw: socket.socket) -> dict[str, Any]:
        """The server's INFO line, read byte by byte: nothing past it may be consumed before TLS."""
        line = b""
        while not line.endswith(_CRLF):
            chunk = raw.recv(1)
            if not chunk:
                raise NatsError("the server closed the connection before its INFO")
            line += chunk
            if len(line) > _MAX_LINE:
                raise NatsError("INFO line too long")
        if not line.startswith(b"INFO "):
            raise NatsError(f"expected INFO, got {line[:40]!r}")
        info: dict[str, Any] = json.loads(line[5:])
        return info

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> SystemClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- requests -----------------------------------------------------------------------------------

    def request_all(
        self, subject: str, payload: bytes, *, expected: int, timeout: float = 5.0
    ) -> list[Reply]:
        """Publish a request and return the replies gathered until `expected` came or `timeout` ran
        out (the replies so far: possibly none). Every node of a cluster answers a system request."""
        self._sid += 1
        sid = self._sid
        inbox = f"_INBOX.{secrets.token_hex(12)}"
        self._send(
            f"SUB {inbox} {sid}\r\nPUB {subject} {inbox} {len(payload)}\r\n".encode() + payload + _CRLF
        )
        deadline = time.monotonic() + timeout
        replies: list[Reply] = []
        while len(replies) < expected:
            reply = self._next_message(deadline)
            if reply is None:
                break
            if reply.subject != inbox:  # a subscription's message: `next_message` returns it
                self._pending.append(reply)
                continue
            if reply.status == 503:  # no responders: nobody subscribes to the subject
                break
            replies.append(reply)
        self._send(f"UNSUB {sid}\r\n".encode())
        return replies

    def request(self, subject: str, payload: bytes, *, timeout: float = 5.0) -> Reply | None:
        """Publish a request and return its first answer (None: none within `timeout`, or no
        responders)."""
        replies = self.request_all(subject, payload, expected=1, timeout=timeout)
        return replies[0] if replies else None

    # --- subscriptions ------------------------------------------------------------------------------

    def subscribe(self, subject: str, *, timeout: float = 5.0) -> int:
        """Subscribe to `subject` (wildcards allowed) and return the subscription id, once the server
        has taken it (a PING answered after the SUB). Its messages come from `next_message`."""
        self._sid += 1
        self._send(f"SUB {subject} {self._sid}\r\nPING\r\n".encode())
        self._await_pong(time.monotonic() + timeout)
        return self._sid

    def next_message(self, timeout: float) -> Reply | None:
        """The next message of a subscription, waiting up to `timeout` (None: nothing came). PINGs
        are answered meanwhile; a closed connection raises `NatsError`."""
        if self._pending:
            return self._pending.popleft()
        return self._next_message(time.monotonic() + timeout)

    # --- the wire -----------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise NatsError(f"the NATS connection failed: {exc}") from None

    def _line(self, deadline: float) -> bytes | None:
        while _CRLF not in self._buffer:
            if not self._fill(deadline):
                return None
        line, _, self._buffer = self._buffer.partition(_CRLF)
        return line

    def _exactly(self, count: int, deadline: float) -> bytes | None:
        while len(self._buffer) < count:
            if not self._fill(deadline):
                return None
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError:
            return False
        except OSError as exc:
            raise NatsError(f"the NATS connection failed: {exc}") from None
        if not chunk:
            raise NatsError("the NATS server closed the connection")
        self._buffer += chunk
        return True

    def _await_pong(self, deadline: float) -> None:
        while True:
            line = self._line(deadline)
            if line is None:
                raise NatsError("no PONG from the NATS server")
            if line == b"PONG":
                return
            if line.startswith((b"MSG ", b"HMSG ")):
                message = self._message(line, deadline)
                if message is not None:
                    self._pending.append(message)
                continue
            self._control(line)

    def _control(self, line: bytes) -> None:
        if line == b"PING":
            self._send(b"PONG" + _CRLF)
        elif line.startswith(b"-ERR"):
            raise NatsError(f"the NATS server refused: {line[5:].decode(errors='replace')}")
        # +OK, INFO updates: nothing to do

    def _next_message(self, deadline: float) -> Reply | None:
        while True:
            line = self._line(deadline)
            if line is None:
                return None
            if line.startswith((b"MSG ", b"HMSG ")):
                return self._message(line, deadline)
            self._control(line)

    def _message(self, line: bytes, deadline: float) -> Reply | None:
        fields = line.split()
        headered = fields[0] == b"HMSG"
        subject = fields[1].decode()
        total = int(fields[-1])
        header_size = int(fields[-2]) if headered else 0
        body = self._exactly(total + 2, deadline)
        if body is None:  # the deadline came mid-message: put its line back for the next read
            self._buffer = line + _CRLF + self._buffer
            return None
        status = None
        if headered:
            first = body[:header_size].split(_CRLF, 1)[0].split()
            status = int(first[1]) if len(first) > 1 and first[1].isdigit() else None
        return Reply(subject, body[header_size:total], status)


def request_any(
    urls: Sequence[str],
    subject: str,
    payload: bytes,
    *,
    expected: int,
    user_jwt: str,
    user_key: KeyPair,
    ssl_context: ssl.SSLContext | None,
    timeout: float = 5.0,
) -> list[Reply]:
    """`request_all` through the first node of `urls` that takes the connection (failover in order)."""
    failures = []
    for url in urls:
        try:
            with SystemClient.connect(
                url, user_jwt=user_jwt, user_key=user_key, ssl_context=ssl_context, timeout=timeout
            ) as client:
                return client.request_all(subject, payload, expected=expected, timeout=timeout)
        except (OSError, NatsError) as exc:
            log.warning("NATS system connection to %s failed: %s", url, exc)
            failures.append(f"{url}: {exc}")
    raise NatsError("no NATS node took the system connection: " + "; ".join(failures))
