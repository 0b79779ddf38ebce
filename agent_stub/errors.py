"""The exception hierarchy of the reference agent.

    AgentError
    ├── NotEnrolledError             the state store holds no identity: enrol first
    ├── CorruptStateError            a state file that exists but cannot be read back (the identity)
    ├── FactsFileError (ValueError)  a facts file or override mapping that cannot be used
    ├── ContentRejected              a content revision that must not be switched to
    ├── AgentNotRunningError         no live agent process owns the state directory
    ├── AgentAlreadyRunningError     another live agent process owns the state directory
    ├── TrustError                   the CA to pin cannot be settled (no hash, two hashes, none served
    │                                matches): nothing was sent to the manager
    ├── ManagerError                 anything that kept a request to the manager from a usable answer
    │   ├── ManagerUnreachable       connect error, timeout, 5xx: transient, retry with back-off
    │   │   ├── ManagerBadResponse   a 2xx whose body is not what the contract promises
    │   │   └── ManagerUntrusted     the TLS handshake failed: the server's certificate does not chain
    │   │                            to a trusted CA (or is not for its name); nothing was sent
    │   └── ManagerRejected          a 4xx: the manager refused the request (`status`, `detail`);
    │                                401/403 mean the agent's credentials are revoked or wrong
    └── LinkError                    anything that kept an MQTT operation from completing
        ├── LinkUnavailable          the broker cannot be reached or did not answer in time: transient,
        │   │                        retry with back-off
        │   └── LinkDisconnected     there is no connection, or it dropped while an operation waited
        └── LinkRefused              the broker answered with a failure reason code (`reason_code`,
                                     `reason`): bad credentials or not authorised (CONNACK), a denied
                                     subscription (SUBACK), publication (PUBACK) or unsubscription

Callers catch the narrowest class they can act on. Every one is an expected outcome (a manager, broker,
disk or operator that says no), so the agent logs it and goes on, or the CLI ends with one line on
stderr; a bad document is not an error here: `AgentCore.offer` reports it as an outcome. Errors of the
contract itself (bad topic, bad signature) are `fabric_core.errors.PolicycastError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paho.mqtt.reasoncodes import ReasonCode


class AgentError(Exception):
    """Base class for every error raised by the reference agent."""


class NotEnrolledError(AgentError):
    """The state store holds no identity: the agent must enrol first."""


class CorruptStateError(AgentError):
    """A state file that exists but cannot be read back (raised for the identity only: no fallback)."""


class FactsFileError(AgentError, ValueError):
    """A facts file (or override mapping) that cannot be used; the message says why."""


class ContentRejected(AgentError):
    """A revision that must not be switched to: bad manifest, digest mismatch, a blob that stays corrupt."""


class AgentNotRunningError(AgentError):
    """No live agent process owns the state directory."""


class AgentAlreadyRunningError(AgentError):
    """Another live agent process owns the state directory."""


class TrustError(AgentError):
    """The CA to pin cannot be settled: no CA hash, two different ones, or none the server offers
    matches. Raised before the enrolment token leaves the agent."""


# --- talking to the manager (`manager_client`) -------------------------------------------------------


class ManagerError(AgentError):
    """Base class of every failure to talk to the manager."""


class ManagerUnreachable(ManagerError):
    """The manager could not be reached or failed (connect error, timeout, 5xx)."""


class ManagerBadResponse(ManagerUnreachable):
    """The manager answered 2xx with a body that breaks the contract."""


class ManagerUntrusted(ManagerUnreachable):
    """The TLS handshake failed: the server's certificate does not chain to a CA the agent trusts, or
    is not for the server's name. Nothing was sent. Transient for a running agent (a CA rotation whose
    document has not reached it yet), fatal for an enrolment."""


class ManagerRejected(ManagerError):
    """The manager refused the request with a 4xx."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail

    @property
    def unauthorized(self) -> bool:
        return self.status in (401, 403)


# --- talking to the broker (`mqtt_link`) -------------------------------------------------------------


class LinkError(AgentError):
    """Base class of every failed MQTT operation."""


class LinkUnavailable(LinkError):
    """The broker cannot be reached, or did not answer in time."""


class LinkDisconnected(LinkUnavailable):
    """No connection, or it dropped while an operation waited for its acknowledgement."""


class LinkRefused(LinkError):
    """The broker answered an operation with a failure reason code."""

    def __init__(self, operation: str, reason: ReasonCode) -> None:
        super().__init__(f"{operation}: refused by the broker: {reason} (0x{reason.value:02x})")
        self.operation = operation
        self.reason_code = reason.value
        self.reason = str(reason)
