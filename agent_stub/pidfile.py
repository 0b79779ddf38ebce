"""The `agent.pid` file through which `policycast-agent update-now` finds the running agent."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from agent_stub.errors import AgentAlreadyRunningError, AgentNotRunningError

PID_FILE = "agent.pid"


def pid_path(state_dir: Path) -> Path:
    return Path(state_dir) / PID_FILE


def running_pid(state_dir: Path) -> int:
    """The pid of the live agent of `state_dir`; raises `AgentNotRunningError` otherwise."""
    path = pid_path(state_dir)
    try:
        pid = int(path.read_text().strip())
    except FileNotFoundError as exc:
        raise AgentNotRunningError(f"no agent is running for {state_dir} (no {PID_FILE})") from exc
    except ValueError as exc:
        raise AgentNotRunningError(f"{path} does not hold a pid") from exc
    if not _alive(pid):
        raise AgentNotRunningError(f"the agent (pid {pid}) of {state_dir} is not running; stale {PID_FILE}")
    return pid


def claim(state_dir: Path) -> Path:
    """Write our pid, refusing if another live agent already runs on this state directory."""
    with contextlib.suppress(AgentNotRunningError):
        other = running_pid(state_dir)
        if other != os.getpid():
            raise AgentAlreadyRunningError(f"an agent (pid {other}) already runs for {state_dir}")
    path = pid_path(state_dir)
    path.write_text(f"{os.getpid()}\n")
    return path


def release(path: Path) -> None:
    """Remove our pid file, unless another process has since claimed it."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
