"""What a benchmark reports and where: the result file (`bench/results/<NAME>-<date>.json`, written by
`write_result` alone, whichever command ran the benchmark), the machine it ran on, and the ratio to its
baseline.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.checkout import BENCH_DIR, commit

RESULTS_DIR = BENCH_DIR / "results"


def result_json(result: dict[str, Any]) -> str:
    """A result as the result files hold it (and `--no-write` prints it)."""
    return json.dumps(result, indent=2, default=str)


def result_path(name: str, when: datetime | None = None) -> Path:
    stamp = (when or datetime.now(UTC)).strftime("%Y-%m-%dT%H%M%SZ")
    return RESULTS_DIR / f"{name}-{stamp}.json"


def write_result(name: str, result: dict[str, Any], path: Path | None = None) -> Path:
    """Write `result` to `path` (default `bench/results/<name>-<now>.json`) whole or not at all; returns
    the path."""
    path = path or result_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(result_json(result) + "\n")
    tmp.replace(path)
    return path


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return round(value / baseline, 2)


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None, to 4 places; None if none is."""
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 4) if present else None


def median_of(rounds: list[dict[str, Any]], side: str, key: str) -> float | None:
    """The median over a benchmark's rounds of one figure of one side (`policycast`, `baseline`)."""
    return median(r[side].get(key) for r in rounds)


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        names = (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
        return next(names, None)
    return None


def machine() -> dict[str, Any]:
    """The machine, the broker and the commit, as the benchmarks on the stack describe them."""
    mosquitto = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        from broker_bridge.mosquitto.install import mosquitto_binary

        out = subprocess.run(
            [mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=5, check=False
        )
        mosquitto = (out.stdout or out.stderr).splitlines()[0].strip()
    return {
        "cpus": os.cpu_count(),
        "cpu": _cpu_model() or "",
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mosquitto": mosquitto,
        "commit": commit(),
        "load_avg_at_start": os.getloadavg(),
    }


def http_machine() -> dict[str, Any]:
    """The machine and the HTTP stack (FastAPI, uvicorn), as benchmarks 2 and 3 describe them."""
    import fastapi
    import uvicorn

    return {
        "hostname": platform.node(),
        "cpu": _cpu_model() or "unknown",
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "load_avg_at_start": os.getloadavg(),
    }
