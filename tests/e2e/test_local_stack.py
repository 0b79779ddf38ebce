"""`make run` is `policycast up`: on an empty data directory it starts the broker (Mosquitto, or a
NATS cluster with `--engine nats --broker-nodes 3`), the manager, the bridge and demo agents, and
shows a policy change reaching push and pull agents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.broker import require_mosquitto
from tests.support.processes import python_env

pytestmark = pytest.mark.e2e


def run_up(tmp_path: Path, *options: str) -> str:
    up = ["up", "--agents", "3", "--port", "0", "--exit-when-converged"]
    result = subprocess.run(
        [sys.executable, "-m", "local_stack", *up, *options],
        cwd=tmp_path,
        env=python_env(POLICYCAST_DATA_DIR=str(tmp_path / "data")),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "push agent(s) applied it within" in output and "pull agent(s) applied it within" in output
    assert "stopped" in output and "Traceback" not in output
    return output


def test_the_local_stack_converges_and_stops_cleanly(tmp_path: Path) -> None:
    require_mosquitto()  # `up` starts its own
    assert "Mosquitto, dynamic security" in run_up(tmp_path)


@pytest.mark.cluster
def test_the_local_stack_runs_push_on_a_three_node_nats_cluster(tmp_path: Path) -> None:
    output = run_up(tmp_path, "--engine", "nats", "--broker-nodes", "3")
    assert "NATS, 3 nodes" in output
