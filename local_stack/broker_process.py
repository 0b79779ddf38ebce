"""A broker as a child process, run from what its engine wrote (`BrokerLaunch`): the local stack's and
the tests' broker, started, stopped and restarted on the same port.

Retained documents and sessions survive a restart through the broker's own persistence.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time

from broker_bridge.engine import BrokerLaunch
from broker_bridge.errors import BrokerUnavailable

log = logging.getLogger(__name__)


class BrokerProcess:
    """The broker `launch` describes, as a child process of this one."""

    def __init__(self, launch: BrokerLaunch) -> None:
        self.launch = launch
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.launch.port

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self.running and self._popen is not None else None

    def start(self, timeout: float = 10.0) -> None:
        """Spawn the broker and return once it has bound its listeners and accepts TCP connections."""
        if self.running:
            return
        log_path = self.launch.log_path
        log_start = log_path.stat().st_size if log_path.exists() else 0
        # Errors before the broker opens its log (a bad config line, a taken port) go to stderr: same file.
        with log_path.open("ab") as output:
            self._popen = subprocess.Popen(self.launch.argv, stdout=output, stderr=subprocess.STDOUT)
        log.info("started %s (pid %d) on port %d", self.launch.argv[0], self._popen.pid, self.port)
        self._wait_listening(timeout, log_start)

    def _wait_listening(self, timeout: float, log_start: int) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self._popen is not None
            if self._popen.poll() is not None:
                code = self._popen.returncode
                self._popen = None
                raise BrokerUnavailable(f"the broker exited with status {code}:\n{self.log_tail()}")
            # A TCP answer alone could come from another process on the port: the broker logs its
            # ready marker once all its listeners are bound.
            if self._logged_ready(log_start) and _accepts_tcp(self.launch.host, self.port):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerUnavailable(
                    f"the broker did not listen on {self.launch.host}:{self.port} in {timeout:.0f}s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0, *, signum: int = signal.SIGTERM) -> None:
        """SIGTERM (the broker saves its persistence on the way out), SIGKILL after `timeout`.
        `signum`: another graceful signal (nats-server's lame duck mode: SIGUSR2)."""
        popen, self._popen = self._popen, None
        if popen is None or popen.poll() is not None:
            return
        popen.send_signal(signum)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the broker (pid %d) ignored SIGTERM for %.0fs: killing it", popen.pid, timeout)
            popen.kill()
            popen.wait()

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved on the way out."""
        popen, self._popen = self._popen, None
        if popen is not None and popen.poll() is None:
            popen.kill()
            popen.wait()

    def restart(self, timeout: float = 10.0) -> None:
        self.stop(timeout)
        self.start(timeout)

    def _logged_ready(self, log_start: int) -> bool:
        with self.launch.log_path.open("rb") as handle:
            handle.seek(log_start)
            return self.launch.ready_marker in handle.read()

    def log_tail(self, lines: int = 30) -> str:
        if not self.launch.log_path.exists():
            return "(no log)"
        return "\n".join(self.launch.log_path.read_text(errors="replace").splitlines()[-lines:])


def _accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
