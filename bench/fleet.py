"""The fleet a benchmark drives: the fleet simulator (`policycast-agent simulate --control`) as a child
process, on a `Stack`.

- `SimulatorControl`: the running simulator and its control protocol (requests on its stdin, JSON-line
  answers and events on its stdout; `agent_stub.simulator.control` is the other end).
- `SimulatorProcess`: a simulated fleet on a stack: its agents enrolled once (`simulate --enrol-only`,
  identities kept beside the stack's data), their broker accounts written in bulk
  (`Stack.provision_in_bulk`), launched under a `SimulatorControl` and ready; quiet when neither the
  manager nor the simulator has heartbeats going.
- `fleet_size`: how many agents (`--agents`, `--full`), and `stack_and_fleet`, both at once.

The fleet runs in another process so that agents and manager do not share one interpreter lock. Both
processes read the same clock (`time.time()`), so latencies are measured across them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.checkout import ROOT, child_env
from bench.console import say
from bench.stack import Stack, kept_stack

DEFAULT_AGENTS = 2000
FULL_AGENTS = 10_000
GROUPS = 10
LOCATIONS = 2


def fleet_size(args: argparse.Namespace) -> int:
    agents: int | None = getattr(args, "agents", None)
    if agents:
        return agents
    return FULL_AGENTS if getattr(args, "full", False) else DEFAULT_AGENTS


def size_note(args: argparse.Namespace, agents: int) -> str:
    """What a result's notes add when the fleet had the default size, not the issue's full one."""
    if getattr(args, "agents", None) is None and not getattr(args, "full", False):
        return f" Measured with {agents} agents (the default); --full runs 10,000."
    return ""


class SimulatorControl:
    """A running `policycast-agent simulate --control`: requests on its stdin, JSON-line answers on its
    stdout."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        command = [sys.executable, "-m", "agent_stub", "simulate", "--control", *argv]
        self.command = command
        log = log_path.open("ab")
        self.popen = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, env=child_env()
        )
        log.close()
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="sim-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self._events.put(json.loads(line))
        self._events.put(None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"the simulator sent no {event!r} within {timeout:.0f}s; see {self.log_path}"
                )
            try:
                message = self._events.get(timeout=remaining)
            except queue.Empty:
                continue
            if message is None:
                raise RuntimeError(
                    f"the simulator exited ({self.popen.wait()}); see {self.log_path}:\n{self.tail()}"
                )
            if message.get("event") == "error":
                raise RuntimeError(f"the simulator refused a request: {message.get('detail')}")
            if message.get("event") == event:
                return message

    def request(self, op: str, timeout_s: float = 60.0, **fields: Any) -> dict[str, Any]:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps({"op": op, "timeout_s": timeout_s, **fields}).encode() + b"\n")
        self.popen.stdin.flush()
        return self.expect(op, timeout_s + 60)

    def stop(self, timeout: float = 120.0) -> dict[str, Any] | None:
        """Stop the fleet (sessions end cleanly); returns its final summary."""
        if self.popen.poll() is not None:
            return None
        summary = None
        try:
            assert self.popen.stdin is not None
            self.popen.stdin.write(b'{"op": "stop"}\n')
            self.popen.stdin.flush()
            summary = self.expect("stopped", timeout)
            self.popen.wait(30)
        except (TimeoutError, RuntimeError, OSError, subprocess.TimeoutExpired):
            self.kill()
        return summary

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class SimulatorProcess:
    """The fleet simulator as a child process on a `Stack`: its agents enrolled (once, kept),
    provisioned, started and ready."""

    def __init__(
        self,
        stack: Stack,
        agents: int,
        *,
        mode: str = "push",
        connect_rate: float = 500.0,
        extra: list[str] | None = None,
        ready_timeout: float | None = None,
    ) -> None:
        self.stack = stack
        self.agents = agents
        self.identities = stack.data_dir / "identities.json"
        self.log_path = stack.data_dir / "simulator.log"
        self.argv = [
            "--agents",
            str(agents),
            "--server",
            stack.url,
            "--admin-key",
            stack.admin_key,
            "--mode",
            mode,
            "--groups",
            str(GROUPS),
            "--locations",
            str(LOCATIONS),
            "--identities",
            str(self.identities),
            "--connect-rate",
            str(connect_rate),
            "--log-level",
            "ERROR",
            *(extra or []),
        ]
        assert stack.broker is not None
        self.argv += ["--mqtt-url", stack.broker.url]
        if stack.ca_file is not None:
            # The run's CA, for the admin API and every agent (HTTPS and MQTT over TLS), as an operator
            # hands it out; the join tokens pin the same CA by its hash.
            self.argv += ["--ca-file", str(stack.ca_file)]
        self.ready_timeout = ready_timeout or 120 + agents * 0.05
        self.process: SimulatorControl | None = None
        self.ready: dict[str, Any] = {}
        self.setup: dict[str, Any] = {}

    def enrol(self) -> None:
        """Enrol the agents the identities file lacks, and wait for the bridge to provision them."""
        began = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "agent_stub", "simulate", "--enrol-only", "--no-progress", *self.argv],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"enrolment failed:\n{result.stderr[-2000:]}")
        summary = json.loads(result.stdout)
        self.setup["enrolled_now"] = summary["enrolled_now"]
        self.setup["enrol_s"] = round(time.monotonic() - began, 1)
        if summary["enrolled_now"]:
            say(f"enrolled {summary['enrolled_now']} new agent(s) in {self.setup['enrol_s']}s")
        began = time.monotonic()
        written = self.stack.provision_in_bulk()  # not one control command at a time by the bridge
        if written:
            self.setup["provision_bulk_s"] = round(time.monotonic() - began, 1)
            say(f"wrote {written} broker accounts in bulk in {self.setup['provision_bulk_s']}s")
        provision_s = self.stack.wait_provisioned(timeout=600 + self.agents * 0.2)
        self.setup["provision_wait_s"] = round(provision_s, 1)

    def start(self) -> dict[str, Any]:
        self.enrol()
        return self.launch()

    def wait_quiet(self, timeout: float = 300.0) -> float:
        """Until the manager hears next to no heartbeats and the simulator has none waiting to go out.

        The manager's count alone can be fooled by a lull: a storm once began while heartbeats queued
        during the fleet's start were still waiting for a connection, and they went out during it.
        """
        began = time.monotonic()
        while True:
            self.stack.wait_quiet(timeout=timeout)
            pending = self.control.request("rates", since=time.time())["heartbeats_pending"]
            if pending == 0:
                return time.monotonic() - began
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"the simulator still has {pending} heartbeat(s) waiting to go out")
            time.sleep(0.5)

    def launch(self) -> dict[str, Any]:
        """Start the simulator (agents already enrolled and provisioned) and wait until it is ready."""
        say(f"starting {self.agents} simulated {'bare MQTT clients' if '--bare' in self.argv else 'agents'}")
        self.process = SimulatorControl(self.argv, self.log_path)
        self.ready = self.process.expect("ready", self.ready_timeout + 120)
        if not self.ready.get("ok"):
            raise RuntimeError(
                f"the fleet was not ready in {self.ready_timeout:.0f}s: {self.ready.get('documents')} "
                f"documents, {self.ready.get('push_sessions')} push sessions of {self.agents}"
            )
        self.setup["ready_s"] = self.ready["timings"].get("ready_s")
        self.setup["start_s"] = self.ready["timings"].get("start_s")
        say(f"fleet ready: {self.ready['push_sessions']} push sessions, {self.ready['documents']} documents")
        return self.ready

    @property
    def control(self) -> SimulatorControl:
        assert self.process is not None
        return self.process

    def keys(self) -> list[str]:
        return sorted(k for k in self.ready["serials"] if k != "none")

    def stop(self) -> dict[str, Any] | None:
        return self.process.stop() if self.process is not None else None

    def __enter__(self) -> SimulatorProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.stop()


@contextlib.contextmanager
def stack_and_fleet(
    args: argparse.Namespace, agents: int, **fleet_options: Any
) -> Iterator[tuple[Stack, SimulatorProcess]]:
    with kept_stack(args) as stack:
        stack.ensure_root_policy()
        with SimulatorProcess(stack, agents, **fleet_options) as fleet:
            yield stack, fleet
