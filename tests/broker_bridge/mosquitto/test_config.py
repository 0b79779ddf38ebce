"""Mosquitto's files as Policycast writes them: fleet settings and the initial dynamic-security JSON."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest

from broker_bridge.engine import TlsListener
from broker_bridge.errors import BrokerNotInstalled
from broker_bridge.mosquitto.config import BrokerLayout, render_config, render_dynsec, write_broker_files
from broker_bridge.mosquitto.install import find_dynsec_plugin


def config_lines(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


def test_config_has_the_fleet_settings(tmp_path: Path) -> None:
    layout = BrokerLayout(tmp_path)
    tls = TlsListener(18830, tmp_path / "broker.pem", tmp_path / "broker.key")
    text = render_config(bind="0.0.0.0", layout=layout, plugin_path="/x/dynsec.so", tls=tls)
    lines = config_lines(text)
    for expected in (
        "per_listener_settings false",
        "listener 18830 0.0.0.0",
        f"certfile {tls.certfile}",
        f"keyfile {tls.keyfile}",
        "tls_version tlsv1.2",
        "allow_anonymous false",
        "plugin /x/dynsec.so",
        f"plugin_opt_config_file {layout.dynsec_path}",
        "persistence true",
        f"persistence_location {layout.persistence_dir}/",
        "autosave_interval 60",
        "max_queued_messages 100000",
        "max_queued_bytes 0",
        "max_inflight_messages 100",
        "persistent_client_expiration 14d",
        "set_tcp_nodelay true",
        "max_keepalive 300",
        f"log_dest file {layout.log_path}",
        f"pid_file {layout.pid_path}",
    ):
        assert expected in lines, expected
    assert "backlog" in text  # the comment on pacing connects
    assert sum(line.startswith("listener") for line in lines) == 1


def test_dynsec_json_denies_by_default_and_hashes_like_mosquitto() -> None:
    content = render_dynsec(bridge_username="bridge", bridge_password="s3cret", prefix="pc")
    assert content["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": True,
    }
    (client,) = content["clients"]
    assert client["username"] == "bridge"
    assert {r["rolename"] for r in client["roles"]} == {"pc-bridge", "pc-dynsec-admin"}
    salt = base64.b64decode(client["salt"])
    assert len(salt) == 12 and client["iterations"] == 101
    expected = hashlib.pbkdf2_hmac("sha512", b"s3cret", salt, 101)
    assert base64.b64decode(client["password"]) == expected
    roles = {role["rolename"]: role["acls"] for role in content["roles"]}
    bridge = {(acl["acltype"], acl["topic"]) for acl in roles["pc-bridge"]}
    assert bridge == {
        ("publishClientSend", "pc/v1/config/#"),
        ("publishClientSend", "pc/v1/agents/+/cmd"),
        ("publishClientSend", "pc/v1/agents/+/state"),
        ("subscribePattern", "pc/v1/agents/+/state"),
        ("publishClientReceive", "pc/v1/agents/+/state"),
    }
    admin = {(acl["acltype"], acl["topic"]) for acl in roles["pc-dynsec-admin"]}
    assert {kind for kind, _ in admin} == {"publishClientSend", "publishClientReceive", "subscribePattern"}
    assert {topic for _, topic in admin} == {"$CONTROL/dynamic-security/#"}


def test_write_broker_files_never_clobbers_the_dynsec_json(tmp_path: Path) -> None:
    layout = BrokerLayout(tmp_path / "broker")
    common = {
        "layout": layout,
        "bind": "127.0.0.1",
        "bridge_username": "b",
        "prefix": "pc",
        "plugin_path": "/p",
        "tls": None,
    }
    write_broker_files(plain_port=1, bridge_password="first", **common)  # type: ignore[arg-type]
    assert stat.S_IMODE(layout.dynsec_path.stat().st_mode) == 0o600
    first = layout.dynsec_path.read_text()
    write_broker_files(plain_port=2, bridge_password="second", **common)  # type: ignore[arg-type]
    assert layout.dynsec_path.read_text() == first
    assert "listener 2 127.0.0.1" in layout.config_path.read_text()
    assert json.loads(first)["clients"][0]["username"] == "b"


def test_missing_plugin_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerNotInstalled, match="does not exist"):
        find_dynsec_plugin(str(tmp_path / "nope.so"))


def test_a_plain_listener_only_when_asked_for_and_never_none(tmp_path: Path) -> None:
    layout = BrokerLayout(tmp_path)
    tls = TlsListener(8883, tmp_path / "broker.crt", tmp_path / "broker.key")
    text = render_config(bind="0.0.0.0", layout=layout, plugin_path="/x/dynsec.so", tls=tls, plain_port=1883)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    at = lines.index("listener 8883 0.0.0.0")
    assert lines[at + 1 : at + 3] == [f"certfile {tls.certfile}", f"keyfile {tls.keyfile}"]
    assert "listener 1883 0.0.0.0" in lines
    assert "allow_anonymous false" in lines and sum(line.startswith("listener") for line in lines) == 2
    with pytest.raises(ValueError, match="needs a listener"):
        render_config(bind="0.0.0.0", layout=layout, plugin_path="/x/dynsec.so", tls=None)
