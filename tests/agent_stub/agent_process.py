"""A real `policycast-agent run` process, and a small fake manager for it (HTTP heartbeats only; the
`http_manager` fixture of conftest serves it)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class HeartbeatServer(BaseHTTPRequestHandler):
    """Answers every heartbeat from one signed document (serial 42), then says "in an hour"."""

    envelope: bytes = b""
    heartbeats: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).heartbeats.append(body)
        doc = json.loads(self.envelope)
        changed = body["serial"] < doc["doc"]["serial"]
        answer = {"changed": changed, "serial": doc["doc"]["serial"], "next_heartbeat_s": 3600}
        if changed:
            answer["config"] = doc
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def start_agent(state_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`python -m agent_stub run ARGS` with its state directory from the environment."""
    environment = {
        **os.environ,
        "POLICYCAST_AGENT_STATE_DIR": str(state_dir),
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "agent_stub", "run", *args],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def running_agent(state_dir: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """`start_agent`, killed on the way out if the test did not stop it (`stop_agent`)."""
    proc = start_agent(state_dir, *args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def stop_agent(proc: subprocess.Popen[str], *, timeout: float) -> str:
    """SIGTERM, as an operator stops it; asserts a clean exit and returns what it logged."""
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    return stderr
