"""Measuring a process that holds many connections: percentiles, resident memory, file descriptors.

Generic helpers shared by the fleet simulator (`agent_stub.simulator`) and the benchmarks (`bench`):
nothing here knows about agents. `cache_missing_sniffio` is a process-wide fix for a cost of httpcore
that only shows with thousands of requests in flight.
"""

from __future__ import annotations

import importlib.util
import math
import resource
import sys
from collections.abc import Iterable


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (every agent holds a socket); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def cache_missing_sniffio() -> None:
    """Make a missing `sniffio` fail fast on import.

    httpcore imports `sniffio` on every request (to tell asyncio from trio) and falls back to asyncio when
    it is absent, as it is with recent anyio. A failed import is not cached: each one searches sys.path
    on disk, which cost about a tenth of the simulator's CPU. `None` in `sys.modules` is Python's own way
    of saying "not importable", answered without a search.
    """
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (Linux), 0 where /proc is not available."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def percentiles(values: Iterable[float]) -> dict[str, float | int]:
    """p50/p90/p99/max (nearest-rank), min, mean and count of `values`, in the values' unit."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {
        "count": len(ordered),
        "min": round(ordered[0], 4),
        "p50": round(rank(0.50), 4),
        "p90": round(rank(0.90), 4),
        "p99": round(rank(0.99), 4),
        "max": round(ordered[-1], 4),
        "mean": round(sum(ordered) / len(ordered), 4),
    }
