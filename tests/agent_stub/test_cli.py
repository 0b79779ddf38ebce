"""The `policycast-agent` CLI: enrol, status, update-now, and a real `run` process with signals."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from agent_stub import cli
from agent_stub.errors import ManagerRejected
from agent_stub.manager_client import ManagerClient
from agent_stub.pidfile import PID_FILE
from agent_stub.state import FileStateStore, Identity
from fabric_core.signing import SigningKey
from fabric_core.wire import EnrollResponse, SigningKeyInfo
from tests.agent_stub.agent_process import HeartbeatServer, running_agent, stop_agent
from tests.agent_stub.conftest import GROUP_ID, LOCATION_ID, broker_identity, make_doc
from tests.support.broker import Broker
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _invoke(*args: str) -> Any:
    return runner.invoke(cli.app, list(args))


def _fake_enroll(key: SigningKey, calls: list[dict[str, Any]]) -> Any:
    async def enroll(**kwargs: Any) -> EnrollResponse:
        calls.append(kwargs)
        verify = key.verify_key
        return EnrollResponse(
            agent_id="a-42",
            secret="s",
            group_id=GROUP_ID,
            signing_key=SigningKeyInfo(kid=verify.kid, public_key=verify.public_base64),
        )

    return enroll


def test_enroll_stores_the_identity(
    state_dir: Path, signing_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ManagerClient, "enroll", _fake_enroll(signing_key, calls))

    result = _invoke(
        "enroll",
        "--server",
        "http://m.test:8000/",
        "--token",
        "tok",
        "--hostname",
        "h1",
        "--state-dir",
        str(state_dir),
        "--insecure-http",
    )

    assert result.exit_code == 0, result.output
    assert "agent a-42 in group 3" in result.stdout
    assert "travel in clear" in result.stderr
    [call] = calls
    assert (call["server"], call["token"], call["hostname"]) == ("http://m.test:8000", "tok", "h1")
    identity = FileStateStore(state_dir).load_identity()
    assert identity is not None
    assert (identity.agent_id, identity.server, identity.group_id) == ("a-42", "http://m.test:8000", GROUP_ID)
    assert identity.trusted_cas == []  # plain HTTP: nothing pinned


def test_enroll_refuses_to_replace_an_identity_without_force(
    file_store: FileStateStore, state_dir: Path, signing_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ManagerClient, "enroll", _fake_enroll(signing_key, []))
    file_store.save_current(b"old document")
    args = ["enroll", "--server", "http://m.test", "--token", "t", "--state-dir", str(state_dir)]
    args.append("--insecure-http")

    refused = _invoke(*args)
    assert refused.exit_code == 1
    assert "already enrolled as agent agent-1" in refused.stderr

    forced = _invoke(*args, "--force")
    assert forced.exit_code == 0, forced.output
    assert file_store.load_identity().agent_id == "a-42"  # type: ignore[union-attr]
    assert file_store.load_current() is None  # the old identity's document is forgotten


def test_enroll_with_unreachable_manager_fails_cleanly(state_dir: Path) -> None:
    result = _invoke(
        "enroll",
        "--server",
        "http://127.0.0.1:1",
        "--token",
        "t",
        "--state-dir",
        str(state_dir),
        "--insecure-http",
    )
    assert result.exit_code == 1
    assert "cannot reach the manager at http://127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.output
    assert not state_dir.exists()


def test_enroll_refused_token_fails_cleanly(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(**kwargs: Any) -> EnrollResponse:
        raise ManagerRejected(403, "token expired")

    monkeypatch.setattr(ManagerClient, "enroll", refuse)
    result = _invoke(
        "enroll",
        "--server",
        "http://m.test",
        "--token",
        "t",
        "--state-dir",
        str(state_dir),
        "--insecure-http",
    )
    assert result.exit_code == 1
    assert "refused the enrolment (403): token expired" in result.stderr


@pytest.mark.parametrize(
    ("server", "token", "message"),
    [("m.test:80", "t", "http:// or https://"), ("http://m.test", "", "invalid enrolment request: token")],
)
def test_enroll_bad_input_fails_cleanly(state_dir: Path, server: str, token: str, message: str) -> None:
    args = ["--server", server, "--token", token, "--state-dir", str(state_dir), "--insecure-http"]
    result = _invoke("enroll", *args)
    assert result.exit_code == 1
    assert message in result.stderr


HASH_A = "sha256:" + "a" * 64
HASH_B = "sha256:" + "b" * 64


@pytest.mark.parametrize(
    ("server", "token", "extra", "message"),
    [
        ("http://m.test", "t", [], "refusing to enrol over plain HTTP (http://m.test)"),
        ("https://m.test", "t", [], "no CA hash to pin: use the join token printed by `policycast admin"),
        ("https://m.test", "t", ["--ca-hash", "sha256:short"], "a CA hash looks like sha256:<64 hex digits>"),
        ("https://m.test", f"t.{HASH_A}", ["--ca-hash", HASH_B], f"the join token pins {HASH_A}"),
    ],
    ids=["http-without-insecure-http", "https-without-hash", "malformed-hash", "two-hashes"],
)
def test_enroll_refuses_before_sending_anything(
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    server: str,
    token: str,
    extra: list[str],
    message: str,
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ManagerClient, "enroll", _fake_enroll(SigningKey.generate(), calls))
    result = _invoke("enroll", "--server", server, "--token", token, "--state-dir", str(state_dir), *extra)
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert calls == []  # the token never left
    assert not state_dir.exists()


def test_status_shows_identity_and_held_document(
    file_store: FileStateStore, state_dir: Path, signing_key: SigningKey
) -> None:
    file_store.save_current(signing_key.sign_envelope(make_doc(serial=12, mode="push")))
    result = _invoke("status", "--state-dir", str(state_dir))
    assert result.exit_code == 0, result.output
    for expected in ("agent-1", "serial held", "12", "push", str(LOCATION_ID), "running", "no"):
        assert expected in result.stdout


def test_commands_need_an_enrolled_agent(state_dir: Path) -> None:
    for command in ("status", "run"):
        result = _invoke(command, "--state-dir", str(state_dir))
        assert result.exit_code == 1
        assert "not enrolled" in result.stderr


def test_run_with_unusable_trusted_cas_fails_cleanly(state_dir: Path, identity: Identity) -> None:
    broken = "-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n"  # PEM-shaped, not DER
    FileStateStore(state_dir).save_identity(identity.model_copy(update={"trusted_cas": [broken]}))
    result = _invoke("run", "--state-dir", str(state_dir))
    assert result.exit_code == 1
    assert "unusable trusted CAs" in result.stderr
    assert not (state_dir / PID_FILE).exists()


def test_update_now_without_a_running_agent_fails(file_store: FileStateStore, state_dir: Path) -> None:
    result = _invoke("update-now", "--state-dir", str(state_dir))
    assert result.exit_code == 1
    assert "no agent is running" in result.stderr

    (state_dir / PID_FILE).write_text("999999999\n")  # a pid that cannot exist
    stale = _invoke("update-now", "--state-dir", str(state_dir))
    assert stale.exit_code == 1
    assert "stale" in stale.stderr


# --- a real agent process --------------------------------------------------------------------------


PROCESS_WAIT_S = 10.0
"""How long to wait for a real agent process (a Python interpreter starting) before failing."""


def test_run_applies_updates_now_on_sigusr1_and_stops_on_sigterm(
    http_manager: str, state_dir: Path, identity: Identity
) -> None:
    FileStateStore(state_dir).save_identity(identity.model_copy(update={"server": http_manager}))
    with running_agent(state_dir) as proc:
        # The first heartbeat applies serial 42, the second reports it at once; then a 3600 s sleep.
        wait_for(
            lambda: len(HeartbeatServer.heartbeats) == 2,
            timeout=PROCESS_WAIT_S,
            what="len(HeartbeatServer.heartbeats) == 2",
        )
        assert HeartbeatServer.heartbeats[1]["serial"] == 42
        wait_for(
            (state_dir / PID_FILE).exists, timeout=PROCESS_WAIT_S, what="(state_dir / PID_FILE).exists()"
        )
        assert int((state_dir / PID_FILE).read_text()) == proc.pid

        result = _invoke("update-now", "--state-dir", str(state_dir))
        assert result.exit_code == 0, result.output
        wait_for(  # the 3600 s sleep was cut short
            lambda: len(HeartbeatServer.heartbeats) == 3,
            timeout=PROCESS_WAIT_S,
            what="len(HeartbeatServer.heartbeats) == 3",
        )
        assert HeartbeatServer.heartbeats[2]["serial"] == 42

        stderr = stop_agent(proc, timeout=5)

    assert f"applied serial 42 (group {GROUP_ID}, location {LOCATION_ID}) from heartbeat" in stderr
    assert not (state_dir / PID_FILE).exists()
    assert FileStateStore(state_dir).load_current() == HeartbeatServer.envelope


def test_update_now_as_the_agent_starts_does_not_kill_it(
    http_manager: str, state_dir: Path, identity: Identity
) -> None:
    """`update-now` may signal as soon as the pid file exists, before the event loop handles SIGUSR1:
    SIGUSR1's default action would end the process. Starting is a heartbeat anyway."""
    FileStateStore(state_dir).save_identity(identity.model_copy(update={"server": http_manager}))
    with running_agent(state_dir) as proc:
        # No pause between looks: signal the moment the file appears.
        wait_for(
            lambda: _alive(proc) and (state_dir / PID_FILE).exists(),
            timeout=20,
            what="the pid file",
            interval=0,
        )
        for _ in range(20):
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.005)  # not a wait: the signals are spread over the start on purpose
        wait_for(
            lambda: proc.poll() is not None or len(HeartbeatServer.heartbeats) >= 2,
            timeout=PROCESS_WAIT_S,
            what="proc.poll() is not None or len(HeartbeatServer.heartbeats) >= 2",
        )
        assert proc.poll() is None, "a SIGUSR1 as it started killed the agent"
        stop_agent(proc, timeout=5)


def test_run_keeps_a_push_session_and_status_shows_the_transport(
    http_manager: str, state_dir: Path, signing_key: SigningKey, mosquitto: Broker
) -> None:
    HeartbeatServer.envelope = signing_key.sign_envelope(make_doc(serial=42, mode="push"))
    identity = broker_identity(signing_key, mosquitto).model_copy(update={"server": http_manager})
    FileStateStore(state_dir).save_identity(identity)
    with running_agent(state_dir) as proc:
        wait_for(
            lambda: _status_row("transport", state_dir) == "push",
            timeout=PROCESS_WAIT_S,
            what='_status_row("transport", state_dir) == "push"',
        )
        # Heartbeats go on in push mode, and say so.
        assert _invoke("update-now", "--state-dir", str(state_dir)).exit_code == 0
        wait_for(
            lambda: HeartbeatServer.heartbeats[-1]["mode"] == "push",
            timeout=PROCESS_WAIT_S,
            what='HeartbeatServer.heartbeats[-1]["mode"] == "push"',
        )
        stderr = stop_agent(proc, timeout=5)

    assert "push: subscribed to policycast/v1/config/3/7" in stderr
    assert _status_row("transport", state_dir) == "-"
    assert FileStateStore(state_dir).load_status().transport is None  # type: ignore[union-attr]


def _alive(proc: subprocess.Popen[str]) -> bool:
    assert proc.poll() is None, f"the agent exited with {proc.returncode}"
    return True


def _status_row(name: str, state_dir: Path) -> str | None:
    for line in _invoke("status", "--state-dir", str(state_dir)).stdout.splitlines():
        cells: list[str] = [cell.strip() for cell in line.strip("│┃|").split("│")]
        if len(cells) == 2 and cells[0] == name:
            return cells[1]
    return None
