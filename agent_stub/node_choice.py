"""Which broker node an agent's link tries next (issue [3/6]: a node that dies moves its agents).

Each node's failures since the last good session are counted, weighted by how far the attempt got: a
node that refused or did not take the TCP connection in time, or dropped the session, counts
`UNREACHABLE`; one that took the connection but not the session (TLS, CONNACK: it may be busy) counts
`UNANSWERED`. The next attempt goes, at random, to one of the nodes that failed least, and not to the
one just tried while another is as good; so a dead node is tried again only after every live one has
failed twice. A good session forgets the counts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fabric_core.settings import MqttAddress

UNANSWERED = 1
"""The weight of a node's failure once it took the TCP connection."""
UNREACHABLE = 2
"""The weight of a node that refused the TCP connection, did not take it in time, or dropped the session."""

_SHARED_RNG = random.Random()
"""For choosers given no rng of their own (one generator for all: each is 2.5 KB, and there are
thousands of links in the simulator)."""


class NodeChoice:
    def __init__(self, nodes: Sequence[MqttAddress], rng: random.Random | None = None) -> None:
        self.nodes = tuple(nodes)
        self._rng = rng or _SHARED_RNG
        self._strikes: dict[MqttAddress, int] = {}

    @property
    def untried(self) -> int:
        """Nodes that have not failed (nor dropped the session) since the last good session."""
        return sum(1 for node in self.nodes if not self._strikes.get(node))

    @property
    def fails_over(self) -> bool:
        """A node failed, and another has not since the last good session."""
        return bool(self._strikes) and self.untried > 0

    def strike(self, node: MqttAddress, weight: int) -> None:
        self._strikes[node] = self._strikes.get(node, 0) + weight

    def succeeded(self) -> None:
        self._strikes.clear()

    def pick(self, last: MqttAddress) -> MqttAddress:
        """The node to connect to next, `last` being the one tried last."""
        if len(self.nodes) == 1:
            return self.nodes[0]
        others = [node for node in self.nodes if node != last] if self._strikes else list(self.nodes)
        least = min(self._strikes.get(node, 0) for node in others)
        best = [node for node in others if self._strikes.get(node, 0) == least]
        if self._strikes.get(last, 0) < least:  # the last one tried failed less than any other
            best = [last]
        return self._rng.choice(best)
