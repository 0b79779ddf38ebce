"""Where this machine keeps Mosquitto and its dynamic-security plugin."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from broker_bridge.errors import BrokerNotInstalled

DYNSEC_PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",  # Debian / Ubuntu package (amd64)
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",  # Debian / Ubuntu package (arm64)
    "/usr/lib/mosquitto_dynamic_security.so",  # the official eclipse-mosquitto docker image
    "/usr/local/lib/mosquitto_dynamic_security.so",  # built from source with `make install`
    "/opt/homebrew/lib/mosquitto_dynamic_security.so",  # Homebrew on Apple silicon
)
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")
INSTALL_HINT = "install it with `apt-get install -y mosquitto` (Debian/Ubuntu) or `brew install mosquitto`"


def find_dynsec_plugin(override: str | None = None) -> str:
    """The dynamic-security plugin: `override` when given, else the first of the usual install paths."""
    if override:
        if not Path(override).is_file():
            raise BrokerNotInstalled(f"dynamic-security plugin {override!r} does not exist")
        return override
    for candidate in DYNSEC_PLUGIN_PATHS:
        if Path(candidate).is_file():
            return candidate
    raise BrokerNotInstalled(
        "Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) was not found in "
        f"{', '.join(DYNSEC_PLUGIN_PATHS)}; {INSTALL_HINT}, or pass its path"
    )


def mosquitto_binary() -> str:
    """The `mosquitto` executable, from PATH or the usual sbin directories (often not on PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in MOSQUITTO_PATHS:
        if os.access(candidate, os.X_OK):
            return candidate
    raise BrokerNotInstalled(f"the Mosquitto broker (`mosquitto`) is not installed: {INSTALL_HINT}")
