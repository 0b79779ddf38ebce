"""Where the benchmarks run from: this checkout (its root, first on the PYTHONPATH of every child process
the benchmarks start, and its commit) and the state they keep in it between runs (`bench/.work/`,
gitignored).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / ".work"


def work_dir(args: argparse.Namespace, name: str = "fleet") -> Path:
    """`name` under the kept work directory (`--work-dir`), emptied first once per run with `--fresh`."""
    root = Path(getattr(args, "work_dir", None) or WORK_DIR)
    path = root / name
    if getattr(args, "fresh", False) and path.exists() and not getattr(args, "_fresh_done", False):
        shutil.rmtree(path)
        args._fresh_done = True  # once per `python -m bench` run, not once per benchmark
    path.mkdir(parents=True, exist_ok=True)
    return path


def child_env(root: Path = ROOT, settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process that runs the code of `root` (this checkout by default, or
    another one, e.g. an older commit's `git worktree`): `root` first on PYTHONPATH.

    Without `settings` the child inherits this process's environment whole, `POLICYCAST_*` included;
    with `settings` (empty included) its `POLICYCAST_*` variables are those alone."""
    if settings is None:
        env = dict(os.environ)
    else:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYCAST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.update(settings or {})
    return env


def commit(root: Path = ROOT) -> str:
    """The short commit `root` has checked out, "" if git cannot say."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=False
        )
        return out.stdout.strip()
    return ""
