"""What the benchmarks print while they run: timestamped progress lines on stderr.

Results go to files (`bench.results`) and stdout stays free for what a command prints on purpose (a
summary, `--list`, `--no-write`'s JSON).
"""

from __future__ import annotations

from datetime import datetime

from rich.console import Console

console = Console(stderr=True, highlight=False)
"""The benchmarks' console (stderr, rich markup); the local stack's broker logs its start through it too."""


def say(message: str) -> None:
    """One progress line, prefixed with the time of day."""
    console.print(f"[dim]{datetime.now().strftime('%H:%M:%S')}[/] {message}")
