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
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.tree import Tree
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from manager_db.database import make_engine, migrate
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
        server_header=False,  # 17 bytes on every heartbeat answer, for nobody (docs/performance.md)
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
    signing_key = guarded(lambda: load_signing_key(settings, create=False), "loading the signing key")
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


@app.command("broker-config")
def broker_config(
    out: Annotated[Path, typer.Option(help="directory for mosquitto.conf, the dynsec JSON, data and log")],
    port: Annotated[int, typer.Option(help="the broker's listening port")] = 1883,
    bind: Annotated[str, typer.Option(help="the broker's listening address")] = "0.0.0.0",
    plugin: Annotated[str | None, typer.Option(help="path of mosquitto_dynamic_security.so")] = None,
    run_as: Annotated[str | None, typer.Option(help="user the broker drops to when started by root")] = None,
) -> None:
    """Write a Mosquitto configuration for Policycast: dynamic security, persistence, fleet-sized queues.

    The bridge's broker password is POLICYCAST_MQTT_PASSWORD, or derived from the signing key."""
    from broker_bridge.credentials import bridge_password
    from broker_bridge.mosquitto import BrokerLayout, find_dynsec_plugin, write_broker_files
    from fabric_core.signing import load_signing_key

    settings = load_settings()

    def write() -> BrokerLayout:
        layout = BrokerLayout(out)
        write_broker_files(
            layout=layout,
            port=port,
            bind=bind,
            bridge_username=settings.mqtt_username,
            bridge_password=bridge_password(
                settings, None if settings.mqtt_password else load_signing_key(settings, create=False)
            ),
            prefix=settings.mqtt_prefix,
            plugin_path=plugin or find_dynsec_plugin(),
            user=run_as,
        )
        return layout

    layout = guarded(write, "writing the broker configuration")
    console.print(
        f"wrote {layout.config_path} and {layout.dynsec_path}; run: mosquitto -c {layout.config_path}"
    )


def _require_schema(engine: Engine) -> None:
    from sqlalchemy import inspect

    if "fabric_counters" not in inspect(engine).get_table_names():
        raise ValueError(
            "the database has no Policycast schema yet: run `policycast serve` or `policycast admin migrate`"
        )


class ModeChoice(StrEnum):
    push = "push"
    pull = "pull"


@app.command()
def plan(
    agents: Annotated[int, typer.Option(min=0, help="how many agents")],
    mode: Annotated[ModeChoice, typer.Option(help="push (MQTT) or pull (heartbeats only)")] = ModeChoice.push,
    heartbeat: Annotated[str, typer.Option(help="heartbeat interval: 300s, 5m, 1h")] = "5m",
    utilisation: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="plan api cores to run at this share of capacity")
    ] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
) -> None:
    """Request rate, bandwidth, broker connections and api cores for a fleet, from measured costs."""
    import json

    from api.capacity import describe, measured_costs, parse_duration
    from api.capacity import plan as make_plan

    try:
        interval = parse_duration(heartbeat)
    except ValueError as exc:
        fail(str(exc))
    costs = measured_costs()
    result = make_plan(agents, mode.value, interval, costs=costs, utilisation=utilisation)
    if as_json:
        sys.stdout.write(json.dumps({"plan": result.as_dict(), "costs": vars(costs)}, indent=2) + "\n")
        return
    table = Table(show_header=False, box=None)
    for what, value in describe(result, costs):
        table.add_row(f"[bold]{what}[/]", value)
    console.print(table)


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


@admin_app.command("enroll-token")
def enroll_token(
    server: Annotated[str, typer.Option(help="the manager's URL")] = "http://127.0.0.1:8080",
    group: Annotated[
        str, typer.Option(help="group name (created under the root if --create)")
    ] = "My Company",
    create: Annotated[bool, typer.Option(help="create the group if it does not exist")] = False,
    mode: Annotated[str | None, typer.Option(help="with --create: push or pull for the new group")] = None,
    max_uses: Annotated[int | None, typer.Option(min=1, help="how many agents may use it")] = None,
) -> None:
    """Ask a running manager for an enrolment token (with POLICYCAST_BOOTSTRAP_ADMIN_KEY); print it alone."""
    import httpx

    settings = load_settings()
    if settings.bootstrap_admin_key is None:
        fail("set POLICYCAST_BOOTSTRAP_ADMIN_KEY to an admin API key")
    headers = {"Authorization": f"Bearer {settings.bootstrap_admin_key.get_secret_value()}"}
    try:
        with httpx.Client(base_url=f"{server.rstrip('/')}/api/v1", headers=headers, timeout=10) as admin:
            group_id = _group_id(admin, group, create=create, mode=mode)
            response = admin.post(f"/groups/{group_id}/enrollment-tokens", json={"max_uses": max_uses})
            response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        fail(f"the manager refused: {exc.response.status_code} {exc.response.text}")
    except httpx.HTTPError as exc:
        fail(f"cannot reach the manager at {server}: {exc}")
    sys.stdout.write(response.json()["token"] + "\n")


@admin_app.command("publish-content")
def publish_content(
    directory: Annotated[
        Path, typer.Argument(help="the files of the new revision", exists=True, file_okay=False)
    ],
    kind: Annotated[str, typer.Option(help="content kind, e.g. definitions")] = "definitions",
    server: Annotated[str, typer.Option(help="the manager's URL")] = "http://127.0.0.1:8080",
) -> None:
    """Publish DIRECTORY as the next revision of a content kind, uploading only the files the manager
    does not have yet (with POLICYCAST_BOOTSTRAP_ADMIN_KEY)."""
    import hashlib

    import httpx
    from rich.progress import Progress

    settings = load_settings()
    if settings.bootstrap_admin_key is None:
        fail("set POLICYCAST_BOOTSTRAP_ADMIN_KEY to an admin API key")
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    if not files:
        fail(f"{directory} holds no files")
    headers = {"Authorization": f"Bearer {settings.bootstrap_admin_key.get_secret_value()}"}
    listed = []
    try:
        with (
            httpx.Client(base_url=f"{server.rstrip('/')}/api/v1", headers=headers, timeout=60) as admin,
            Progress(console=errors) as progress,
        ):
            task = progress.add_task("uploading", total=sum(p.stat().st_size for p in files))
            for path in files:
                data = path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if admin.head(f"/blobs/{digest}").status_code != 200:
                    admin.put(f"/blobs/{digest}", content=data).raise_for_status()
                listed.append({"path": path.relative_to(directory).as_posix(), "sha256": digest})
                progress.advance(task, len(data))
            response = admin.post(f"/content/{kind}/revisions", json={"files": listed})
            response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        fail(f"the manager refused: {exc.response.status_code} {exc.response.text}")
    except httpx.HTTPError as exc:
        fail(f"cannot reach the manager at {server}: {exc}")
    revision = response.json()
    console.print(f"published {kind} revision {revision['revision']} ({len(listed)} files)")


def _group_id(admin: Any, name: str, *, create: bool, mode: str | None) -> int:
    response = admin.get("/groups")
    response.raise_for_status()
    groups = response.json()
    for group in groups:
        if group["name"] == name:
            return int(group["id"])
    if not create:
        fail(f"no group named {name!r} (add --create to make it under the root)")
    root = next(g for g in groups if g["parent_id"] is None)
    made = admin.post("/groups", json={"name": name, "parent_id": root["id"], "inherit": mode is None})
    made.raise_for_status()
    if mode is not None:
        admin.put(f"/groups/{made.json()['id']}/communication", json={"mode": mode}).raise_for_status()
    return int(made.json()["id"])


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
