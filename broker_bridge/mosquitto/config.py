"""Mosquitto's configuration, as Policycast writes it: for operators, the local stack and the tests.

`render_config` / `render_dynsec` / `write_broker_files`: a `mosquitto.conf` sized for fleets and the
initial dynamic-security JSON with the bridge's account, written into one directory (`BrokerLayout`).
Production brokers are configured by their operators; the settings here are the reference for them.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from broker_bridge.engine import TlsListener
from fabric_core.topics import all_cmds_filter, all_configs_filter, all_states_filter

log = logging.getLogger(__name__)

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


def _listeners(tls: TlsListener | None, plain_port: int | None, bind: str) -> str:
    if tls is None and plain_port is None:
        raise ValueError("a broker needs a listener: MQTT over TLS, or a plain port asked for explicitly")
    text = ""
    if tls is not None:
        text += (
            "# MQTT over TLS, with a certificate from the manager's CA (agents trust only that CA).\n"
            "# certfile and keyfile belong to the listener above them; TLS 1.2 and newer.\n"
            f"listener {tls.port} {bind}\ncertfile {tls.certfile}\nkeyfile {tls.keyfile}\n"
            "tls_version tlsv1.2\n"
        )
    if plain_port is not None:
        text += (
            "# Plain MQTT, asked for by the operator: passwords and documents travel in clear here.\n"
            f"listener {plain_port} {bind}\n"
        )
    return text


def render_config(
    *,
    bind: str,
    layout: BrokerLayout,
    plugin_path: str,
    tls: TlsListener | None,
    plain_port: int | None = None,
    user: str | None = None,
) -> str:
    """A `mosquitto.conf` for a fleet of push agents, commented with why each setting is there.

    `tls`: the MQTT-over-TLS listener; `plain_port`: a plaintext listener, only when an operator asks
    for one. `user`: who the broker runs as when started by root; default: whoever runs this, so that a
    broker started by root (containers, CI) does not drop to `mosquitto` and lose access to `layout`.
    """
    run_as = user or getpass.getuser()
    persistence = f"{layout.persistence_dir}/"  # 1.x appends the file name as is; 2.0 adds a "/" itself
    listeners = _listeners(tls, plain_port, bind)
    return f"""\
# Written by Policycast (broker_bridge.mosquitto.render_config). Mosquitto 2.0.

# One set of authentication and ACL settings for every listener: the dynamic-security plugin decides.
per_listener_settings false

{listeners}
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
        "textname": "Policycast bridge",  # Mosquitto 2.0.11 reads "textname", not "textName"
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
    bind: str,
    tls: TlsListener | None,
    bridge_username: str,
    bridge_password: str,
    prefix: str,
    plugin_path: str,
    plain_port: int | None = None,
    user: str | None = None,
) -> None:
    """Write `mosquitto.conf` (always) and the dynamic-security JSON (only when absent).

    Mosquitto rewrites the JSON whenever a client or role is provisioned, so an existing file is the
    broker's state: overwriting it would forget every agent account.
    """
    layout.directory.mkdir(parents=True, exist_ok=True)
    layout.persistence_dir.mkdir(parents=True, exist_ok=True)
    layout.config_path.write_text(
        render_config(
            bind=bind, layout=layout, plugin_path=plugin_path, tls=tls, plain_port=plain_port, user=user
        )
    )
    if layout.dynsec_path.exists():
        log.info("keeping the existing %s", layout.dynsec_path)
        return
    content = render_dynsec(bridge_username=bridge_username, bridge_password=bridge_password, prefix=prefix)
    write_dynsec(layout.dynsec_path, content)


def write_dynsec(path: Path, content: dict[str, Any]) -> None:
    """Replace the dynamic-security JSON at `path` whole or not at all: a temporary file beside it,
    created 0600 (it holds password hashes, and Mosquitto keeps its own 0600), flushed to disk, then
    renamed over `path`. Only while the broker is stopped: a running one rewrites the file itself."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(orjson.dumps(content, option=orjson.OPT_INDENT_2))  # 10,000 agents: ~0.1 s
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
