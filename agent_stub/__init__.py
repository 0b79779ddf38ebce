"""The reference Policycast agent: enrolment, state store, pull loop and CLI.

`core` holds the pure apply logic (verify, parse, anti-rollback) and talks to storage only through a
`state.StateStore`; transports (`pull`, later push over MQTT and the fleet simulator) feed it envelopes.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    AGENT_VERSION = version("policycast")
except PackageNotFoundError:  # running from a source tree that was never installed
    AGENT_VERSION = "0.0.0+source"
