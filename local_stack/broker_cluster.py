"""A broker cluster as child processes: every node an engine's `write_cluster` described, started,
waited for, killed and restarted one by one (the tests' and a laptop's NATS cluster).

Ready means more than listening: each node answers its monitoring endpoint's
`/healthz?js-enabled-only=true`, and in a cluster every node knows the JetStream meta leader (`/jsz`),
without which NATS's MQTT cannot load sessions or store retained messages.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from broker_bridge.engine import BrokerLaunch
from broker_bridge.errors import BrokerUnavailable
from local_stack.broker_process import BrokerProcess

log = logging.getLogger(__name__)

LAME_DUCK_TIMEOUT_S = 45.0
"""nats-server's lame duck takes its 30 s duration plus the grace period before it exits."""


class BrokerCluster:
    """The nodes `launches` describe (in order), as child processes of this one."""

    def __init__(self, launches: Sequence[BrokerLaunch]) -> None:
        if not launches:
            raise ValueError("a cluster needs one node at least")
        self.launches = tuple(launches)
        self.nodes = [BrokerProcess(launch) for launch in self.launches]

    def __len__(self) -> int:
        return len(self.nodes)

    def start(self, timeout: float = 30.0) -> BrokerCluster:
        """Start every node and return once each is ready and the cluster has formed."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.start(timeout=max(deadline - time.monotonic(), 1.0))
        self.wait_formed(deadline - time.monotonic())
        return self

    def wait_formed(self, timeout: float = 30.0, *, nodes: Sequence[int] | None = None) -> None:
        """Wait until the running nodes (or `nodes`) are healthy and, in a cluster, agree that there
        is a JetStream meta leader."""
        deadline = time.monotonic() + timeout
        indexes = list(nodes) if nodes is not None else [i for i, n in enumerate(self.nodes) if n.running]
        pending = set(indexes)
        while pending:
            for index in sorted(pending):
                if not self.nodes[index].running:
                    raise BrokerUnavailable(
                        f"{self.launches[index].name} exited:\n{self.nodes[index].log_tail()}"
                    )
                if self._ready(index):
                    pending.discard(index)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(self.launches[i].name for i in sorted(pending))
                raise BrokerUnavailable(f"{names} not ready within {timeout:.0f}s")
            time.sleep(0.05)

    def _ready(self, index: int) -> bool:
        launch = self.launches[index]
        if launch.monitor_url is None:
            return True  # listening is all a node without monitoring can tell
        if _get(f"{launch.monitor_url}/healthz?js-enabled-only=true") is None:
            return False
        if len(self.nodes) == 1:
            return True
        jsz = _get(f"{launch.monitor_url}/jsz")
        return bool(jsz and jsz.get("meta_cluster", {}).get("leader"))

    def kill(self, index: int) -> None:
        """SIGKILL one node (a crash)."""
        self.nodes[index].kill()
        log.info("killed %s", self.launches[index].name)

    def restart(self, index: int, timeout: float = 30.0) -> None:
        """Start a stopped or killed node again (killing it first if it runs) and wait until it is
        back in the cluster."""
        self.nodes[index].kill()
        self.nodes[index].start(timeout=timeout)
        self.wait_formed(timeout, nodes=[index])

    def stop(self, *, lame_duck: bool = False, timeout: float | None = None) -> None:
        """Stop every node: SIGTERM (a clean shutdown), or with `lame_duck` nats-server's lame duck
        mode (SIGUSR2: clients are closed over its duration, so they move to other nodes gradually);
        SIGKILL after `timeout`."""
        signum = signal.SIGUSR2 if lame_duck else signal.SIGTERM
        wait = timeout if timeout is not None else (LAME_DUCK_TIMEOUT_S if lame_duck else 10.0)
        # All at once: one node's lame duck must not wait for another's.
        stoppers = [
            threading.Thread(target=n.stop, args=(wait,), kwargs={"signum": signum}) for n in self.nodes
        ]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()

    def __enter__(self) -> BrokerCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def _get(url: str) -> dict[str, Any] | None:
    """The JSON of a 200 answer, else None."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as answer:
            if answer.status != 200:
                return None
            body: dict[str, Any] = json.loads(answer.read() or b"{}")
            return body
    except (urllib.error.URLError, OSError, ValueError):
        return None
