"""`policycast-agent enroll` over HTTPS against real servers: the CA pinned by the join token's hash, the
token sent only to a server that proves it holds a certificate from that CA; then `run` trusts only the
CAs the manager names, through a whole CA rotation."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from fabric_core.settings import Settings
from fabric_core.tls import (
    CertificateFiles,
    ManagerCA,
    ca_hash,
    client_context,
    promote_next_ca,
    server_context,
)
from tests.support.clients import Admin
from tests.support.processes import AgentProcess, Manager, agent_cli, python_env
from tests.support.waiting import wait_for

ADMIN_KEY = "pck_agent-trust"
PROCESS_WAIT_S = 20.0
"""Bounds a failure only: real processes (a manager, agents) start and restart here."""


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    with Manager(tmp_path / "manager", tmp_path, admin_key=ADMIN_KEY, tls=True) as manager:
        yield manager


def _token(manager: Manager, max_uses: int = 1) -> dict[str, Any]:
    """`token`, `join_token` and `ca_hash` of a new token of the root group."""
    answer: dict[str, Any] = manager.admin.post(
        f"/groups/{manager.root()}/enrollment-tokens", {"max_uses": max_uses}
    )
    return answer


def _enroll(server: str, token: str, state_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = agent_cli("enroll", "--server", server, "--token", token, "--state-dir", str(state_dir), *extra)
    return subprocess.run(argv, env=python_env(), capture_output=True, text=True, timeout=60, check=False)


def _identity(state_dir: Path) -> dict[str, Any]:
    identity: dict[str, Any] = json.loads((state_dir / "identity.json").read_text())
    return identity


def _trusted_hashes(state_dir: Path) -> set[str]:
    return {ca_hash(pem.encode()) for pem in _identity(state_dir)["trusted_cas"]}


def _assert_refused(result: subprocess.CompletedProcess[str], message: str, state_dir: Path) -> None:
    assert result.returncode == 1, result.stdout
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (state_dir / "identity.json").exists()


# --- enrolment -------------------------------------------------------------------------------------------


def test_a_join_token_pins_the_ca_and_the_agent_heartbeats_over_https(
    manager: Manager, tmp_path: Path
) -> None:
    assert manager.ca is not None
    state_dir = tmp_path / "agent"
    token = _token(manager)
    assert token["ca_hash"] == manager.ca.hash

    result = _enroll(manager.url, token["join_token"], state_dir)

    assert result.returncode == 0, result.stderr
    assert f"trusting CA {manager.ca.hash}" in result.stdout
    assert manager.url.startswith("https://")
    assert _trusted_hashes(state_dir) == {manager.ca.hash}
    assert (state_dir / "identity.json").stat().st_mode & 0o777 == 0o600
    agent = AgentProcess("agent", state_dir, env=python_env(), log_dir=tmp_path).start()
    try:
        wait_for(
            lambda: agent.applied() and _last_heartbeat(state_dir),
            timeout=PROCESS_WAIT_S,
            what=lambda: f"a heartbeat that applied a document\n{agent.output()}",
        )
        # The document came with the answer to a heartbeat: over HTTPS, trusting the pinned CA only.
        assert json.loads((state_dir / "status.json").read_text())["last_error"] is None
    finally:
        assert agent.stop() == 0, agent.output()
    assert "Traceback" not in agent.output()


def test_a_wrong_ca_hash_is_refused_and_the_token_is_never_sent(manager: Manager, tmp_path: Path) -> None:
    assert manager.ca is not None
    token = _token(manager, max_uses=1)
    other = ManagerCA.generate().hash
    state_dir = tmp_path / "agent"

    refused = _enroll(manager.url, token["token"], state_dir, "--ca-hash", other)

    _assert_refused(refused, f"offers {manager.ca.hash}, not the pinned CA {other}", state_dir)
    assert "refusing: nothing was sent" in refused.stderr
    # The token was never used: its one use is still there.
    enrolled = _enroll(manager.url, token["join_token"], state_dir)
    assert enrolled.returncode == 0, enrolled.stderr


def test_a_bare_token_with_the_ca_hash_enrols_too(manager: Manager, tmp_path: Path) -> None:
    assert manager.ca is not None
    state_dir = tmp_path / "agent"
    result = _enroll(manager.url, _token(manager)["token"], state_dir, "--ca-hash", manager.ca.hash.upper())
    assert result.returncode == 0, result.stderr
    assert _trusted_hashes(state_dir) == {manager.ca.hash}


class _Impostor(BaseHTTPRequestHandler):
    """Serves the pinned CA at /agent/v1/ca but holds a certificate from another CA; records requests."""

    bundle: bytes = b""
    requests: list[str] = []

    def do_GET(self) -> None:
        type(self).requests.append(f"GET {self.path}")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-pem-file")
        self.send_header("Content-Length", str(len(self.bundle)))
        self.end_headers()
        self.wfile.write(self.bundle)

    def do_POST(self) -> None:
        type(self).requests.append(f"POST {self.path}")
        self.send_error(500)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def impostor(tmp_path: Path) -> Iterator[tuple[str, ManagerCA]]:
    """An HTTPS server whose certificate chains to CA B while it offers CA A; (url, A)."""
    offered, actual = ManagerCA.generate(), ManagerCA.generate()
    chain, key = actual.issue(["127.0.0.1"])
    files = CertificateFiles(tmp_path / "impostor.pem", tmp_path / "impostor.key")
    files.certfile.write_bytes(chain)
    files.keyfile.write_bytes(key)
    _Impostor.bundle, _Impostor.requests = offered.certificate_pem, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    server.socket = server_context(files).wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", offered
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_without_a_certificate_from_the_pinned_ca_fails_the_handshake(
    impostor: tuple[str, ManagerCA], tmp_path: Path
) -> None:
    url, offered = impostor
    state_dir = tmp_path / "agent"

    result = _enroll(url, f"pcet_secret.{offered.hash}", state_dir)

    _assert_refused(
        result, f"the server at {url} does not prove it holds a certificate from the pinned CA", state_dir
    )
    assert "the token was not sent and nothing was stored" in result.stderr
    assert _Impostor.requests == ["GET /agent/v1/ca"]  # the bundle, fetched unverified; never the token


def test_a_manager_of_another_ca_is_refused(manager: Manager, tmp_path: Path) -> None:
    """The join token of manager A, used against manager B (its own CA): B does not offer A's CA."""
    other = Manager(tmp_path / "other", tmp_path / "other-logs", admin_key=ADMIN_KEY, tls=True)
    (tmp_path / "other-logs").mkdir()
    other.start()
    try:
        state_dir = tmp_path / "agent"
        result = _enroll(other.url, _token(manager)["join_token"], state_dir)
        assert manager.ca is not None and other.ca is not None
        _assert_refused(result, f"offers {other.ca.hash}, not the pinned CA {manager.ca.hash}", state_dir)
    finally:
        other.stop()


def test_plain_http_needs_insecure_http(tmp_path: Path) -> None:
    plain = Manager(tmp_path / "plain", tmp_path, admin_key=ADMIN_KEY, tls=False).start()
    try:
        token = plain.admin.join_token(plain.root())
        state_dir = tmp_path / "agent"
        refused = _enroll(plain.url, token, state_dir)
        _assert_refused(refused, "refusing to enrol over plain HTTP", state_dir)
        enrolled = _enroll(plain.url, token, state_dir, "--insecure-http")
        assert enrolled.returncode == 0, enrolled.stderr
        assert "travel in clear" in enrolled.stderr
        assert _identity(state_dir)["trusted_cas"] == []
    finally:
        plain.stop()


# --- a CA rotation ------------------------------------------------------------------------------------


def _last_heartbeat(state_dir: Path) -> str | None:
    path = state_dir / "status.json"
    at: str | None = json.loads(path.read_text()).get("last_heartbeat_at") if path.exists() else None
    return at


def _heartbeat_after(agent: AgentProcess, state_dir: Path, before: str | None) -> str:
    """Ask the agent to heartbeat now; wait until one succeeded after `before`; its time."""
    agent.signal(signal.SIGUSR1)

    def succeeded() -> str | None:
        status = json.loads((state_dir / "status.json").read_text())
        at = status.get("last_heartbeat_at")
        return at if at is not None and at != before and status.get("last_error") is None else None

    found: str = wait_for(succeeded, timeout=PROCESS_WAIT_S, what=lambda: f"a heartbeat\n{agent.output()}")
    return found


def _trusts(agent: AgentProcess, state_dir: Path, hashes: set[str]) -> None:
    agent.signal(signal.SIGUSR1)
    wait_for(
        lambda: _trusted_hashes(state_dir) == hashes,
        timeout=PROCESS_WAIT_S,
        what=lambda: f"the agent to trust {sorted(hashes)}\n{agent.output()}",
    )


def test_the_agent_follows_a_ca_rotation(manager: Manager, tmp_path: Path) -> None:
    """Old CA; documents name old and new; the servers switch to the new CA's certificates; documents name
    only the new one. The agent heartbeats throughout, and ends up trusting the new CA alone."""
    old = manager.ca
    assert old is not None
    state_dir = tmp_path / "agent"
    assert _enroll(manager.url, _token(manager)["join_token"], state_dir).returncode == 0
    agent = AgentProcess("agent", state_dir, env=python_env(), log_dir=tmp_path).start()
    try:
        wait_for(agent.applied, timeout=PROCESS_WAIT_S, what=lambda: f"a document\n{agent.output()}")
        settings = Settings(data_dir=manager.data_dir)
        new = ManagerCA.load_or_create(settings.tls_dir / "next")  # as `policycast admin tls prepare-ca`
        manager.admin.post("/tls/trusted-cas", {"pem": new.certificate_pem.decode()})
        _trusts(agent, state_dir, {old.hash, new.hash})

        last = _last_heartbeat(state_dir)
        promote_next_ca(settings)
        manager.stop()
        manager.ca = new  # what the test's own clients trust from now on
        both = client_context(old.certificate_pem + new.certificate_pem)
        manager.admin = Admin(httpx.Client(base_url=manager.url, verify=both), ADMIN_KEY)
        manager.start()
        served = ssl.get_server_certificate(("127.0.0.1", manager.port))
        assert _issued_by(served, new), "the restarted manager still serves a certificate of the old CA"
        last = _heartbeat_after(agent, state_dir, last)

        manager.admin.delete(f"/tls/trusted-cas/{old.hash}")
        _trusts(agent, state_dir, {new.hash})
        _heartbeat_after(agent, state_dir, last)  # over a client that trusts the new CA only
    finally:
        code = agent.stop()
    assert code == 0, agent.output()
    assert "Traceback" not in agent.output()


def _issued_by(certificate_pem: str, ca: ManagerCA) -> bool:
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
    try:
        certificate.verify_directly_issued_by(ca.certificate)
    except Exception:
        return False
    return True
