"""`policycast`: the manager's command line (serve, up, admin ...).

Every command builds `Settings` once from the environment and passes it down. Errors an operator can
act on are printed as one line on stderr with a non-zero exit, never as a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.tree import Tree
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from api.db import make_engine, migrate
from fabric_core.settings import Settings

app = typer.Typer(
    help="Policycast manager: policies and content for fleets of endpoint agents.", no_args_is_help=True
)
admin_app = typer.Typer(
    help="Administration: API keys, the database, the fleet at a glance.", no_args_is_help=True
)
app.add_typer(admin_app, name="admin")
console = Console()
errors = Console(stderr=True)
T = TypeVar("T")


class RoleChoice(StrEnum):
    admin = "admin"
    viewer = "viewer"


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        fail(f"invalid POLICYCAST_* setting: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")


def fail(message: str, code: int = 1) -> NoReturn:
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def guarded(action: Callable[[], T], what: str) -> T:
    """Run `action`; turn the failures an operator can fix into a one-line message."""
    try:
        return action()
    except OperationalError as exc:
        fail(f"{what}: cannot reach the database ({exc.orig})")
    except ValueError as exc:
        fail(f"{what}: {exc}")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Migrate the database and serve the admin and agent APIs."""
    import uvicorn

    settings = load_settings()
    guarded(lambda: migrate(make_engine(settings.resolved_database_url)), "migrating the database")
    console.print(
        f"Policycast manager on http://{host}:{port} (API docs at /docs), database {_where(settings)}"
    )
    uvicorn.run(
        "api.asgi:create",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=False,
    )


@app.command()
def bridge() -> None:
    """Relay changed documents and commands to the broker, provision agents' broker accounts, and
    bring agent state back. Run one or more; one at a time holds the relay lease."""
    import signal
    import threading

    from broker_bridge.service import Bridge, connect_link
    from fabric_core.signing import load_signing_key

    settings = load_settings()
    engine = make_engine(settings.resolved_database_url)
    signing_key = guarded(lambda: load_signing_key(settings), "loading the signing key")
    guarded(lambda: _require_schema(engine), "checking the database")
    link = connect_link(settings, signing_key, client_id=f"policycast-bridge-{os.getpid()}")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    console.print(f"bridge: database {_where(settings)}, broker {settings.mqtt_address.url}")
    link.start()
    try:
        Bridge(settings=settings, engine=engine, signing_key=signing_key, link=link).run(stop)
    finally:
        link.close()
    console.print("bridge stopped")


def _require_schema(engine: Engine) -> None:
    from sqlalchemy import inspect

    if "fabric_counters" not in inspect(engine).get_table_names():
        raise ValueError(
            "the database has no Policycast schema yet: run `policycast serve` or `policycast admin migrate`"
        )


@app.command()
def up(
    agents: Annotated[int, typer.Option(min=0, max=200, help="demo pull agents to start")] = 6,
    port: Annotated[int, typer.Option(help="api port; 0 picks a free one")] = 8080,
    exit_when_converged: Annotated[
        bool, typer.Option(help="stop once the demo change reached every agent (for scripts)")
    ] = False,
) -> None:
    """Run the local stack: the manager on SQLite, demo groups and policies, and demo agents."""
    from api.stack import run_stack

    settings = load_settings()
    code = run_stack(
        settings, agents=agents, port=port, exit_when_converged=exit_when_converged, console=console
    )
    raise typer.Exit(code)


@admin_app.command("create-key")
def create_key(
    role: Annotated[
        RoleChoice, typer.Option(help="admin may change state, viewer may only read")
    ] = RoleChoice.admin,
    name: Annotated[str, typer.Option(help="who or what the key is for")] = "operator",
) -> None:
    """Create an API key and print it, alone, on stdout (it is stored hashed: save it now)."""
    from api.services.api_keys import create_api_key

    settings = load_settings()

    def create() -> str:
        engine = make_engine(settings.resolved_database_url)
        migrate(engine)
        with Session(engine) as session:
            return create_api_key(session, name=name, role=role.value)

    key = guarded(create, "creating the key")
    sys.stdout.write(key + "\n")


@admin_app.command("migrate")
def migrate_command() -> None:
    """Bring the database schema up to date."""
    settings = load_settings()
    guarded(lambda: migrate(make_engine(settings.resolved_database_url)), "migrating the database")
    console.print(f"database {_where(settings)} is up to date")


@admin_app.command("groups")
def show_groups() -> None:
    """The group tree, with inheritance and how many agents each group has."""
    from api.services.overview import group_tree

    settings = load_settings()
    rows = guarded(lambda: group_tree(make_engine(settings.resolved_database_url)), "reading groups")
    nodes: dict[int | None, Tree] = {}
    top = Tree("[bold]groups[/]")
    for row in rows:
        label = f"[bold]{row.name}[/] [dim]#{row.id}[/] " + (
            "[cyan]inherits[/]" if row.inherit else "[magenta]own policies[/]"
        )
        label += f" · {row.agents} agent(s)"
        nodes[row.id] = nodes.get(row.parent_id, top).add(label)
    console.print(top)


@admin_app.command("agents")
def show_agents(group: Annotated[int | None, typer.Option(help="only this group")] = None) -> None:
    """The fleet: who holds which serial, and who is out of date."""
    from api.services.overview import agent_rows

    settings = load_settings()
    rows = guarded(
        lambda: agent_rows(make_engine(settings.resolved_database_url), group_id=group), "reading agents"
    )
    table = Table(title=f"{len(rows)} agent(s)")
    for column in ("agent", "host", "group", "location", "mode", "serial", "current", "last seen"):
        table.add_column(column)
    now = datetime.now(UTC)
    for row in rows:
        state = "[green]" if row.serial == row.current_serial else "[yellow]"
        seen = "never" if row.last_seen is None else f"{(now - row.last_seen).total_seconds():.0f}s ago"
        table.add_row(
            row.id[:12],
            row.hostname,
            row.group_name,
            str(row.location_id or "-"),
            row.mode,
            f"{state}{row.serial}[/]",
            str(row.current_serial or "-"),
            seen + (" [red](revoked)[/]" if row.revoked else ""),
        )
    console.print(table)


def _where(settings: Settings) -> str:
    url = settings.resolved_database_url
    return url.split("@")[-1] if "@" in url else url


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()
