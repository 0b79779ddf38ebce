"""`policycast`: the one composition root of the manager's command line.

Every subcommand is registered here, explicitly, from the package that owns it: `serve` and `plan`
(api), `admin` (api), `bridge` and `broker-config` (broker_bridge), `up` (local_stack).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from api import admin_cli, tls_cli
from api import cli as api_cli
from api.cli import EngineChoice
from broker_bridge import cli as bridge_cli
from fabric_core.console import load_settings, stdout
from fabric_core.settings import Settings
from local_stack.composition import WORKER_APP


def up(
    agents: Annotated[int, typer.Option(min=0, max=200, help="demo agents to start")] = 6,
    port: Annotated[int, typer.Option(help="api port; 0 picks a free one")] = 8080,
    exit_when_converged: Annotated[
        bool, typer.Option(help="stop once the demo change reached every agent (for scripts)")
    ] = False,
    engine: Annotated[
        EngineChoice | None,
        typer.Option(help="the push broker; default: the setting (Mosquitto, or NATS when it is missing)"),
    ] = None,
    broker_nodes: Annotated[
        int, typer.Option(min=1, max=9, help="broker nodes (a NATS cluster; Mosquitto runs one)")
    ] = 1,
) -> None:
    """Run the local stack: the manager on SQLite, a broker, the bridge and demo agents.

    Seeds demo groups and policies once, then shows a policy change reaching every agent."""
    from local_stack.stack import run_stack  # the agents' modules, only when the stack runs

    settings = load_settings(Settings)
    code = run_stack(
        settings,
        agents=agents,
        port=port,
        exit_when_converged=exit_when_converged,
        console=stdout,
        engine=engine.value if engine is not None else None,
        broker_nodes=broker_nodes,
    )
    raise typer.Exit(code)


app = typer.Typer(
    help="Policycast manager: policies and content for fleets of endpoint agents.", no_args_is_help=True
)
app.command("serve")(api_cli.serve_command(WORKER_APP))
app.command("bridge")(bridge_cli.bridge)
app.command("broker-config")(bridge_cli.broker_config)
app.add_typer(admin_cli.admin, name="admin")
admin_cli.admin.add_typer(tls_cli.tls, name="tls")
app.command("plan")(api_cli.plan)
app.command("up")(up)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()
