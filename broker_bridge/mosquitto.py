"""A Mosquitto 2 broker that Policycast configures and runs itself (tests, `policycast up`, a laptop).

Three pieces, usable apart:

- `render_config` / `render_dynsec` / `write_broker_files`: a `mosquitto.conf` sized for fleets and the
  initial dynamic-security JSON with the bridge's account, written into one directory (`BrokerLayout`).
- `find_dynsec_plugin` / `mosquitto_binary`: where this machine keeps the broker and its plugin.
- `MosquittoProcess`: the broker as a child process that can be started, stopped and restarted on the
  same port (retained documents survive through the persistence file).

Production brokers are configured by their operators; the settings here are the reference for them.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker_bridge.broker import BrokerUnavailable
from fabric_core.topics import all_cmds_filter, all_configs_filter, all_states_filter

log = logging.getLogger(__name__)

DYNSEC_PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",  # Debian / Ubuntu package (amd64)
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",  # Debian / Ubuntu package (arm64)
    "/usr/lib/mosquitto_dynamic_security.so",  # the official eclipse-mosquitto docker image
    "/usr/local/lib/mosquitto_dynamic_security.so",  # built from source with `make install`
    "/opt/homebrew/lib/mosquitto_dynamic_security.so",  # Homebrew on Apple silicon
)
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")
INSTALL_HINT = "install it with `apt-get install -y mosquitto` (Debian/Ubuntu) or `brew install mosquitto`"

BRIDGE_ROLE = "pc-bridge"
DYNSEC_ADMIN_ROLE = "pc-dynsec-admin"
DYNSEC_TOPICS = "$CONTROL/dynamic-security/#"

# What `mosquitto_ctrl dynsec init` writes for 2.0.x: PBKDF2-HMAC-SHA512, 12-byte salt, 101 rounds. The
# broker hashes every password it is sent with the same count, and checks one on every CONNECT: a fleet
# reconnecting at once makes that count a CPU cost, which is why Mosquitto keeps it low.
_PBKDF2_ITERATIONS = 101
_SALT_BYTES = 12


@dataclass(frozen=True, slots=True)
class BrokerLayout:
    """Where one broker keeps its files: everything under `directory`."""

    directory: Path

    @property
    def config_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def dynsec_path(self) -> Path:
        return self.directory / "dynamic-security.json"

    @property
    def persistence_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    @property
    def pid_path(self) -> Path:
        return self.directory / "mosquitto.pid"


def render_config(
    *, port: int, bind: str, layout: BrokerLayout, plugin_path: str, user: str | None = None
) -> str:
    """A `mosquitto.conf` for a fleet of push agents, commented with why each setting is there.

    `user`: who the broker runs as when started by root; default: whoever runs this, so that a broker
    started by root (containers, CI) does not drop to `mosquitto` and lose access to `layout`.
    """
    run_as = user or getpass.getuser()
    persistence = f"{layout.persistence_dir}/"  # 1.x appends the file name as is; 2.0 adds a "/" itself
    return f"""\
# Written by Policycast (broker_bridge.mosquitto.render_config). Mosquitto 2.0.

# One set of authentication and ACL settings for every listener: the dynamic-security plugin decides.
per_listener_settings false

listener {port} {bind}
# Mosquitto 2.0's listen() backlog (about 100) cannot be configured: agents pace and jitter their
# connects so that a fleet coming back after an outage does not overflow it.

# Every client authenticates; what it may read and write comes from its dynamic-security roles.
allow_anonymous false
plugin {plugin_path}
plugin_opt_config_file {layout.dynsec_path}

# Retained effective documents and persistent agent sessions survive a broker restart. Saved on exit
# and every 60 s; a crash loses at most the last minute, which agents recover by heartbeat.
persistence true
persistence_location {persistence}
autosave_interval 60

# The default of 1000 queued messages per client silently drops QoS 1 messages to a slow or offline
# subscriber (the bridge reading every agent's state, an agent away for a while): queue by count only.
max_queued_messages 100000
max_queued_bytes 0
# Unacknowledged QoS 1 messages in flight to one client: enough that the bridge's state subscription
# (every agent's retained state at once) is not paced by round trips, small enough to bound memory.
max_inflight_messages 100

# An agent's session (its subscriptions, its queued commands) outlives two weeks away, not forever:
# decommissioned machines do not leave sessions behind.
persistent_client_expiration 14d

# Documents and commands are small and latency matters more than packet count.
set_tcp_nodelay true
# MQTT 5 clients asking for a longer keepalive are told to use 5 minutes, so that dead connections
# (and the last wills that mark agents offline) are noticed within minutes.
max_keepalive 300

# Started by root, Mosquitto switches to this user: the one that owns this directory.
user {run_as}
pid_file {layout.pid_path}

log_dest file {layout.log_path}
log_type error
log_type warning
log_type notice
log_type information
log_timestamp true
"""


def find_dynsec_plugin(override: str | None = None) -> str:
    """The dynamic-security plugin: `override` when given, else the first of the usual install paths."""
    if override:
        if not Path(override).is_file():
            raise BrokerUnavailable(f"dynamic-security plugin {override!r} does not exist")
        return override
    for candidate in DYNSEC_PLUGIN_PATHS:
        if Path(candidate).is_file():
            return candidate
    raise BrokerUnavailable(
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
    raise BrokerUnavailable(f"the Mosquitto broker (`mosquitto`) is not installed: {INSTALL_HINT}")


# --- the initial dynamic-security file -----------------------------------------------------------------


def hash_password(password: str, *, salt: bytes | None = None) -> dict[str, Any]:
    """The `password`, `salt` and `iterations` fields of a dynsec client, as Mosquitto 2.0 stores them."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": _PBKDF2_ITERATIONS,
    }


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True}


def bridge_acls(prefix: str) -> list[dict[str, Any]]:
    """What the bridge may do: publish documents and commands, read (and clear) every agent's state."""
    every_config = all_configs_filter(prefix)
    every_cmd = all_cmds_filter(prefix)
    states = all_states_filter(prefix)
    return [
        _acl("publishClientSend", every_config),
        _acl("publishClientSend", every_cmd),
        _acl("publishClientSend", states),  # an empty retained payload clears a removed agent's state
        _acl("subscribePattern", states),
        _acl("publishClientReceive", states),
    ]


def dynsec_admin_acls() -> list[dict[str, Any]]:
    """What a dynamic-security administrator needs: send commands and read their responses."""
    return [
        _acl("publishClientSend", DYNSEC_TOPICS),
        _acl("publishClientReceive", DYNSEC_TOPICS),
        _acl("subscribePattern", DYNSEC_TOPICS),
    ]


def render_dynsec(*, bridge_username: str, bridge_password: str, prefix: str) -> dict[str, Any]:
    """The initial dynamic-security JSON: deny by default, and the bridge's account with its two roles."""
    bridge = {
        "username": bridge_username,
        "textName": "Policycast bridge",
        **hash_password(bridge_password),
        "roles": [{"rolename": BRIDGE_ROLE}, {"rolename": DYNSEC_ADMIN_ROLE}],
    }
    return {
        "defaultACLAccess": {
            # Nothing is allowed that a role does not grant; unsubscribing never harms.
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [bridge],
        "groups": [],
        "roles": [
            {"rolename": BRIDGE_ROLE, "acls": bridge_acls(prefix)},
            {"rolename": DYNSEC_ADMIN_ROLE, "acls": dynsec_admin_acls()},
        ],
    }


def write_broker_files(
    *,
    layout: BrokerLayout,
    port: int,
    bind: str,
    bridge_username: str,
    bridge_password: str,
    prefix: str,
    plugin_path: str,
    user: str | None = None,
) -> None:
    """Write `mosquitto.conf` (always) and the dynamic-security JSON (only when absent).

    Mosquitto rewrites the JSON whenever a client or role is provisioned, so an existing file is the
    broker's state: overwriting it would forget every agent account.
    """
    layout.directory.mkdir(parents=True, exist_ok=True)
    layout.persistence_dir.mkdir(parents=True, exist_ok=True)
    layout.config_path.write_text(
        render_config(port=port, bind=bind, layout=layout, plugin_path=plugin_path, user=user)
    )
    if layout.dynsec_path.exists():
        log.info("keeping the existing %s", layout.dynsec_path)
        return
    content = render_dynsec(bridge_username=bridge_username, bridge_password=bridge_password, prefix=prefix)
    # Created 0600 from the start: it holds password hashes.
    fd = os.open(layout.dynsec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(content, handle, indent=2)


# --- the broker process ----------------------------------------------------------------------------------


class MosquittoProcess:
    """`mosquitto -c layout.config_path` as a child process, listening on `port`."""

    def __init__(self, layout: BrokerLayout, port: int, bind: str = "127.0.0.1") -> None:
        self.layout = layout
        self.port = port
        self.bind = bind
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self.running and self._popen is not None else None

    def start(self, timeout: float = 10.0) -> None:
        """Spawn the broker and return once its port accepts TCP connections."""
        if self.running:
            return
        argv = [mosquitto_binary(), "-c", str(self.layout.config_path)]
        log_start = self.layout.log_path.stat().st_size if self.layout.log_path.exists() else 0
        # Errors before the log file opens (a bad config line, a taken port) go to stderr: same file.
        with self.layout.log_path.open("ab") as output:
            self._popen = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
        log.info("started mosquitto (pid %d) on %s:%d", self._popen.pid, self.bind, self.port)
        self._wait_listening(timeout, log_start)

    def _wait_listening(self, timeout: float, log_start: int) -> None:
        deadline = time.monotonic() + timeout
        host = "127.0.0.1" if self.bind in ("0.0.0.0", "") else self.bind
        host = "::1" if host == "::" else host
        while True:
            assert self._popen is not None
            if self._popen.poll() is not None:
                code = self._popen.returncode
                self._popen = None
                raise BrokerUnavailable(f"mosquitto exited with status {code}:\n{self.log_tail()}")
            # A TCP answer alone could come from another process on the port: Mosquitto logs "running"
            # once all its listeners are bound.
            if self._logged_running(log_start) and _accepts_tcp(host, self.port):
                return
            if time.monotonic() > deadline:
                self.stop()
                tail = self.log_tail()
                raise BrokerUnavailable(
                    f"mosquitto did not listen on {host}:{self.port} in {timeout:.0f}s:\n{tail}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Mosquitto saves its persistence file on the way out), SIGKILL after `timeout`."""
        popen, self._popen = self._popen, None
        if popen is None or popen.poll() is not None:
            return
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("mosquitto (pid %d) ignored SIGTERM for %.0fs: killing it", popen.pid, timeout)
            popen.kill()
            popen.wait()

    def restart(self, timeout: float = 10.0) -> None:
        self.stop(timeout)
        self.start(timeout)

    def _logged_running(self, log_start: int) -> bool:
        with self.layout.log_path.open("rb") as handle:
            handle.seek(log_start)
            return b" running" in handle.read()

    def log_tail(self, lines: int = 30) -> str:
        if not self.layout.log_path.exists():
            return "(no log)"
        return "\n".join(self.layout.log_path.read_text(errors="replace").splitlines()[-lines:])


def _accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
