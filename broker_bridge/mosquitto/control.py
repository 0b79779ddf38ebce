"""Mosquitto's dynamic-security control topic, spoken over a `BrokerLink`.

`control(link, commands)` sends a list of commands in one `$CONTROL/dynamic-security/v1` message and
returns their responses, in order. Every caller sharing the response topic (other bridges, api
replicas) sees every response: each command carries correlation data naming its call, and one call
at a time is in flight per link.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import weakref
from typing import Any

from broker_bridge.broker import BrokerLink
from broker_bridge.errors import BrokerUnavailable

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
CONTROL_RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"


class _Call:
    """The responses awaited by one `control` call, matched by correlation data."""

    def __init__(self, tag: str, count: int) -> None:
        self.tag = tag
        self.responses: list[dict[str, Any] | None] = [None] * count
        self.done = threading.Event()

    def offer(self, response: dict[str, Any]) -> None:
        correlation = response.get("correlationData")
        if not isinstance(correlation, str) or not correlation.startswith(self.tag + ":"):
            return  # another caller's (another bridge or api replica shares the response topic)
        index = int(correlation.rpartition(":")[2])
        if 0 <= index < len(self.responses):
            self.responses[index] = response
        if all(item is not None for item in self.responses):
            self.done.set()


class DynsecControl:
    """The control channel of one link: its response subscription and the call in flight."""

    def __init__(self, link: BrokerLink) -> None:
        self._link = link
        self._lock = threading.Lock()
        self._subscribed = False
        self._call: _Call | None = None

    def call(self, commands: list[dict[str, Any]], *, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Send `commands` in one message; return their responses, in order (unchecked: see
        `dynsec.check`)."""
        if not commands:
            return []
        deadline = time.monotonic() + timeout
        with self._lock:
            self._ensure_subscribed(deadline)
            call = _Call(uuid.uuid4().hex, len(commands))
            tagged = [{**command, "correlationData": f"{call.tag}:{i}"} for i, command in enumerate(commands)]
            self._call = call
            try:
                body = json.dumps({"commands": tagged}).encode()
                self._link.publish(CONTROL_TOPIC, body, timeout=max(deadline - time.monotonic(), 0.0))
                if not call.done.wait(max(deadline - time.monotonic(), 0.0)):
                    names = ", ".join(str(c.get("command")) for c in commands)
                    raise BrokerUnavailable(f"no dynamic-security response to {names} within {timeout:.1f}s")
            finally:
                self._call = None
        return [response for response in call.responses if response is not None]

    def _ensure_subscribed(self, deadline: float) -> None:
        if self._subscribed:
            return  # the link restores it on every reconnect
        self._link.wait_connected(deadline)
        self._link.subscribe(CONTROL_RESPONSE_TOPIC, self._on_response, timeout=deadline - time.monotonic())
        self._subscribed = True

    def _on_response(self, topic: str, payload: bytes) -> None:
        call = self._call
        if call is None:
            return
        try:
            responses = json.loads(payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed dynamic-security response: %r", payload[:200])
            return
        for response in responses if isinstance(responses, list) else []:
            if isinstance(response, dict):
                call.offer(response)


_channels: weakref.WeakKeyDictionary[BrokerLink, DynsecControl] = weakref.WeakKeyDictionary()
_channels_lock = threading.Lock()


def control(
    link: BrokerLink, commands: list[dict[str, Any]], *, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Send dynamic-security commands over `link` in one message; return their responses, in order."""
    with _channels_lock:
        channel = _channels.get(link)
        if channel is None:
            channel = _channels[link] = DynsecControl(link)
    return channel.call(commands, timeout=timeout)
