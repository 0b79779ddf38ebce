"""Real processes for end-to-end tests: the manager under uvicorn and agents, on free local ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


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
    env.update(overrides)
    return env


class Manager:
    """`policycast serve` in its own process, with its own data directory and an admin key."""

    def __init__(self, data_dir: Path, log_dir: Path, *, admin_key: str, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_key = admin_key
        env = python_env(
            POLICYCAST_DATA_DIR=str(data_dir),
            POLICYCAST_BOOTSTRAP_ADMIN_KEY=admin_key,
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
        self.admin = httpx.Client(
            base_url=f"{self.url}/api/v1", headers={"Authorization": f"Bearer {admin_key}"}
        )

    def start(self) -> Manager:
        self.process.start()
        wait_for(self._healthy, timeout=30, what=f"the manager on {self.url}\n{self.process.output()}")
        return self

    def _healthy(self) -> bool:
        if not self.process.running:
            raise AssertionError(f"the manager exited:\n{self.process.output()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        return False

    def stop(self) -> None:
        self.process.stop()

    def call(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        response = self.admin.request(method, path, **kwargs)
        assert response.status_code == expect, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else None
