"""`make run` is `policycast up`: on an empty data directory it starts Mosquitto, the manager, the
bridge and demo agents, and shows a policy change reaching push and pull agents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import python_env

pytestmark = pytest.mark.e2e


def test_the_local_stack_converges_and_stops_cleanly(tmp_path: Path, mosquitto: object) -> None:
    # `mosquitto` (the fixture) only makes sure the broker is installed; `up` starts its own.
    result = subprocess.run(
        [sys.executable, "-m", "local_stack", "up", "--agents", "3", "--port", "0", "--exit-when-converged"],
        cwd=tmp_path,
        env=python_env(POLICYCAST_DATA_DIR=str(tmp_path / "data")),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Mosquitto, dynamic security" in output
    assert "push agent(s) applied it within" in output and "pull agent(s) applied it within" in output
    assert "stopped" in output and "Traceback" not in output
