"""`python -m bench` (`make bench`): run every benchmark of the package, write each result as JSON.

A benchmark is any module of `bench` exposing `NAME` and `run(args) -> dict` (see `bench/__init__.py`);
modules are found, not listed. Results go to `bench/results/<NAME>-<date>.json`.

    python -m bench                       every benchmark, default sizes (2,000 agents where a fleet is used)
    python -m bench --full                the issue's sizes (10,000 agents)
    python -m bench --only push_fanout    one benchmark (repeat --only for several)
    python -m bench --agents 500          another fleet size
    python -m bench --only broker_authorisation --baseline-agents 500   a smaller O(N^2) baseline
    python -m bench --list                the benchmarks found
    python -m bench --plain               plain HTTP and MQTT, as before TLS (default: TLS throughout)
    python -m bench --only push_fanout --engine nats [--broker-nodes 3]   on a NATS cluster (default
                                          Mosquitto, one node; NATS 3 nodes)
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import bench
from bench.checkout import WORK_DIR
from bench.console import say
from bench.results import result_json, write_result

SKIP = frozenset({"__main__"})


def discover() -> dict[str, ModuleType]:
    """Benchmark modules by NAME, in module name order."""
    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(bench.__path__), key=lambda m: m.name):
        if info.name in SKIP or info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"bench.{info.name}")
        except Exception as exc:  # one broken module must not hide the others
            say(f"[yellow]skipping bench.{info.name}: cannot import it: {exc}[/]")
            continue
        name = getattr(module, "NAME", None)
        runner = getattr(module, "run", None)
        if isinstance(name, str) and callable(runner):
            found[name] = module
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Policycast's benchmarks.")
    parser.add_argument("--only", action="append", metavar="NAME", help="run this benchmark (repeatable)")
    parser.add_argument("--agents", type=int, default=None, help="fleet size (default: 2000; --full: 10000)")
    parser.add_argument("--full", action="store_true", help="the issue's full sizes")
    parser.add_argument(
        "--baseline-agents",
        type=int,
        default=None,
        help="fleet size of a baseline too slow to measure at --agents (broker_authorisation: the "
        "control API, default 1000)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="repetitions, where a benchmark repeats")
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=None,
        help="simulated MQTT connects per second (fleet benchmarks)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="plain HTTP and MQTT everywhere, as before TLS (default: HTTPS and MQTT over TLS, as "
        "production runs)",
    )
    parser.add_argument(
        "--engine",
        choices=("mosquitto", "nats"),
        default="mosquitto",
        help="the broker engine of the fleet benchmarks (default: mosquitto)",
    )
    parser.add_argument(
        "--broker-nodes",
        type=int,
        default=None,
        help="the broker's nodes (default: 1 for mosquitto, 3 for nats; mosquitto runs one)",
    )
    parser.add_argument("--fresh", action="store_true", help="discard the kept benchmark state first")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="kept state (default: bench/.work)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the benchmarks found and exit")
    parser.add_argument("--no-write", action="store_true", help="do not write result files")
    args = parser.parse_args(argv)
    if args.engine == "mosquitto" and args.broker_nodes not in (None, 1):
        parser.error("Mosquitto runs one node: --broker-nodes needs --engine nats")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modules = discover()
    if args.list:
        for name, module in modules.items():
            doc = (module.__doc__ or "").strip().splitlines()
            print(f"{name:24} {doc[0] if doc else ''}")
        return 0
    wanted = args.only or list(modules)
    unknown = [name for name in wanted if name not in modules]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; found: {', '.join(modules)}", file=sys.stderr)
        return 2
    failures = 0
    summary: list[tuple[str, str]] = []
    for name in wanted:
        runner: Callable[[argparse.Namespace], dict[str, Any]] = modules[name].run
        say(f"[bold]benchmark {name}[/]")
        began = time.monotonic()
        try:
            result = runner(args)
        except Exception:
            failures += 1
            traceback.print_exc()
            summary.append((name, "FAILED"))
            continue
        result.setdefault("name", name)
        result.setdefault("elapsed_s", round(time.monotonic() - began, 1))
        if args.no_write:
            print(result_json(result))
            summary.append((name, "done"))
        else:
            path = write_result(name, result)
            summary.append(
                (name, str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path))
            )
    for name, outcome in summary:
        say(f"{name}: {outcome}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
