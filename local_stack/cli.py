"""The `policycast` command: the manager's CLI (`api.cli`) plus `up`, which runs the local stack."""

from __future__ import annotations

from typing import Annotated

import typer

from api.cli import app, console, load_settings
from api.cli import main as manager_main


@app.command()
def up(
    agents: Annotated[int, typer.Option(min=0, max=200, help="demo pull agents to start")] = 6,
    port: Annotated[int, typer.Option(help="api port; 0 picks a free one")] = 8080,
    exit_when_converged: Annotated[
        bool, typer.Option(help="stop once the demo change reached every agent (for scripts)")
    ] = False,
) -> None:
    """Run the local stack: the manager on SQLite, demo groups and policies, and demo agents."""
    from local_stack.stack import run_stack  # the agents' modules, only when the stack runs

    settings = load_settings()
    code = run_stack(
        settings, agents=agents, port=port, exit_when_converged=exit_when_converged, console=console
    )
    raise typer.Exit(code)


def main() -> None:
    manager_main()
