"""The exception hierarchy of the bridge and its broker engines.

    BrokerError                  anything the broker layer raises
    ├── BrokerUnavailable        not connected, connection lost, no answer in time: try again later
    │   └── BrokerNotInstalled   the engine's broker (or a plugin it needs) is not on this machine
    ├── BrokerRefused            the broker answered no (bad credentials, not authorised, ...): a reason
    │                            code, retrying the same thing will not help
    └── DynsecError              a Mosquitto dynamic-security command answered with an error

A bridge round that fails on any of them backs off and tries again; commands turn them into one line
for the operator.
"""

from __future__ import annotations

_ALREADY_EXISTS = "already exists"
_NOT_FOUND = "not found"
"""The error texts of Mosquitto 2.0.x ("Client already exists", "Role not found", ...)."""


class BrokerError(Exception):
    """Base class of the broker layer's errors."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached or did not answer in time; the same call may succeed later."""


class BrokerNotInstalled(BrokerUnavailable):
    """The broker binary, or a plugin the engine needs, is not installed here."""


class BrokerRefused(BrokerError):
    """The broker answered with a failure reason code."""

    def __init__(self, message: str, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class DynsecError(BrokerError):
    """A dynamic-security command answered with an error."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"dynamic-security {command}: {error}")
        self.command = command
        self.error = error

    @property
    def already_exists(self) -> bool:
        return _ALREADY_EXISTS in self.error.lower()

    @property
    def not_found(self) -> bool:
        return _NOT_FOUND in self.error.lower()
