"""Real processes for end-to-end tests: the manager under uvicorn and agents, on free local ports.

- `Process`: a child process whose output goes to a log file that failures can show.
- `Manager`: `policycast serve` with its own data directory; `admin` is the shared `Admin` client.
- `enrolled_agent`: `policycast-agent enroll` against a manager, giving an `AgentProcess` (not yet
  started) that runs `policycast-agent run` over that state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from fabric_core.signing import VerifyKey, open_envelope
from fabric_core.tls import ManagerCA, client_context
from tests.support.clients import Admin
from tests.support.waiting import wait_for


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Process:
    """A child process whose output goes to a log file that failures can show."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(signum)

    def stop(self, timeout: float = 10) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        code = self.popen.returncode
        self.popen = None
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def python_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYCAST_")}
    # A bridge started by a test serves its metrics on a free port, never the fixed default one
    # (tests run side by side); a test that scrapes them gives a port of its own.
    env["POLICYCAST_BRIDGE_METRICS_PORT"] = "0"
    env.update(overrides)
    return env


TLS_BY_DEFAULT = True
"""`Manager` serves HTTPS unless told otherwise, as `policycast serve` does."""


class Manager:
    """`policycast serve` in its own process, with its own data directory and an admin key."""

    def __init__(
        self, data_dir: Path, log_dir: Path, *, admin_key: str, tls: bool = TLS_BY_DEFAULT, **settings: str
    ) -> None:
        self.port = free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.ca = ManagerCA.load_or_create(data_dir / "tls") if tls else None
        """The manager's CA, made here before it starts (as a first start would), so tests can trust it."""
        env = python_env(
            POLICYCAST_DATA_DIR=str(data_dir),
            POLICYCAST_BOOTSTRAP_ADMIN_KEY=admin_key,
            POLICYCAST_TLS_ENABLED="true" if tls else "false",
            **{f"POLICYCAST_{k.upper()}": v for k, v in settings.items()},
        )
        argv = [
            sys.executable,
            "-m",
            "local_stack",
            "serve",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.process = Process("manager", argv, env=env, log_dir=log_dir)
        self.admin_key = admin_key
        self.admin = self._admin_client()

    def reload_ca(self) -> None:
        """Trust the CA now in the data directory (after `policycast admin tls promote-ca`), from the
        next start on: the admin client and the health check verify with it."""
        tls = self.data_dir / "tls"
        self.ca = ManagerCA.load(tls / "ca.pem", tls / "ca.key")
        self.admin = self._admin_client()

    def _admin_client(self) -> Admin:
        """The admin API with the admin key, verifying the manager with its CA as it stands now."""
        return Admin(httpx.Client(base_url=self.url, verify=self.ssl_context()), self.admin_key)

    def ssl_context(self) -> ssl.SSLContext | bool:
        """What a client of this manager verifies it with: its CA only (True for plain HTTP)."""
        return True if self.ca is None else client_context(self.ca.certificate_pem)

    def start(self) -> Manager:
        self.process.start()
        wait_for(
            self._healthy,
            timeout=30,
            what=lambda: f"the manager on {self.url}\n{self.process.output()}",
            interval=0.02,
        )
        return self

    def _healthy(self) -> bool:
        if not self.process.running:
            raise AssertionError(f"the manager exited:\n{self.process.output()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/healthz", timeout=1, verify=self.ssl_context()).status_code == 200
        return False

    def stop(self) -> None:
        # A kept-alive admin connection would hold up uvicorn's graceful stop until it is killed.
        self.admin.client.close()
        self.process.stop()
        self.admin = self._admin_client()

    def __enter__(self) -> Manager:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def root(self) -> int:
        return int(self.admin.root()["id"])

    def agent_row(self, agent_id: str) -> dict[str, Any]:
        """The agent's row as the manager stored it (its SQLite database, read directly): what the
        admin API does not show, such as a pending update-now request or the stored status."""
        with contextlib.closing(sqlite3.connect(self.data_dir / "policycast.db")) as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM agents WHERE id = ?", (agent_id,)).fetchone()
        assert row is not None, f"no agent {agent_id} in the manager's database"
        return dict(row)


def agent_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent_stub", *args]


def policycast(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the `policycast` command (the manager's CLI) to its end; its output as text."""
    argv = [sys.executable, "-m", "local_stack", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)


class AgentProcess(Process):
    """`policycast-agent run` over an enrolled state directory."""

    def __init__(self, name: str, state_dir: Path, *, env: dict[str, str], log_dir: Path) -> None:
        super().__init__(name, agent_cli("run", "--state-dir", str(state_dir)), env=env, log_dir=log_dir)
        self.state_dir = state_dir
        self.identity: dict[str, Any] = json.loads((state_dir / "identity.json").read_text())
        self.agent_id: str = self.identity["agent_id"]

    def start(self) -> AgentProcess:
        super().start()
        return self

    def applied(self) -> dict[str, Any] | None:
        """The document the agent applied (None before the first), verified against the key it pinned."""
        current = self.state_dir / "current.json"
        if not current.exists():
            return None
        key = self.identity["signing_key"]
        return open_envelope(current.read_bytes(), VerifyKey.from_base64(key["kid"], key["public_key"]))


def enrolled_agent(
    manager: Manager, directory: Path, name: str, *, group_id: int | None = None, **settings: str
) -> AgentProcess:
    """Enrol an agent in the group (the root when not given) with `policycast-agent enroll`; return
    its `run` process, not started; it reports `name` as its hostname. `settings` become
    POLICYCAST_AGENT_* variables of that process."""
    group = group_id if group_id is not None else manager.root()
    # Over HTTPS the join token pins the manager's CA; over plain HTTP the agent must be told it is fine.
    token = manager.admin.join_token(group) if manager.tls else manager.admin.enrollment_token(group)
    state_dir = directory / name
    plain = [] if manager.tls else ["--insecure-http"]
    enrol = subprocess.run(
        agent_cli(
            "enroll",
            "--server",
            manager.url,
            "--token",
            token,
            "--state-dir",
            str(state_dir),
            "--hostname",
            name,
            *plain,
        ),
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert enrol.returncode == 0, enrol.stderr
    env = python_env(**{f"POLICYCAST_AGENT_{k.upper()}": v for k, v in settings.items()})
    return AgentProcess(name, state_dir, env=env, log_dir=directory)
