"""`policycast admin`: API keys, enrolment tokens, content, the database and the fleet at a glance."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.tree import Tree
from sqlmodel import Session

from fabric_core.console import fail, load_settings, stderr, stdout
from fabric_core.settings import Settings
from manager_db.database import describe, guarded, make_engine, migrate

if TYPE_CHECKING:
    import httpx

admin = typer.Typer(
    help="Administration: API keys, the database, the fleet at a glance.", no_args_is_help=True
)


class RoleChoice(StrEnum):
    admin = "admin"
    viewer = "viewer"


@admin.command("create-key")
def create_key(
    role: Annotated[
        RoleChoice, typer.Option(help="admin may change state, viewer may only read")
    ] = RoleChoice.admin,
    name: Annotated[str, typer.Option(help="who or what the key is for")] = "operator",
) -> None:
    """Create an API key and print it, alone, on stdout (it is stored hashed: save it now)."""
    from api.services.api_keys import create_api_key

    settings = load_settings(Settings)

    def create() -> str:
        engine = make_engine(settings.resolved_database_url)
        migrate(engine)
        with Session(engine) as session:
            return create_api_key(session, name=name, role=role.value)

    key = guarded(create, "creating the key")
    sys.stdout.write(key + "\n")


@admin.command("enroll-token")
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
    with _admin_api(server, timeout=10) as admin:
        group_id = _group_id(admin, group, create=create, mode=mode)
        response = admin.post(f"/groups/{group_id}/enrollment-tokens", json={"max_uses": max_uses})
        response.raise_for_status()
    sys.stdout.write(response.json()["token"] + "\n")


@admin.command("publish-content")
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

    from rich.progress import Progress

    listed = []
    with _admin_api(server, timeout=60) as admin:
        files = sorted(p for p in directory.rglob("*") if p.is_file())
        if not files:
            fail(f"{directory} holds no files")
        with Progress(console=stderr) as progress:
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
    revision = response.json()
    stdout.print(f"published {kind} revision {revision['revision']} ({len(listed)} files)")


@contextmanager
def _admin_api(server: str, *, timeout: float) -> Iterator[httpx.Client]:
    """A running manager's admin API with POLICYCAST_BOOTSTRAP_ADMIN_KEY; its failures as one line."""
    import httpx

    settings = load_settings(Settings)
    if settings.bootstrap_admin_key is None:
        fail("set POLICYCAST_BOOTSTRAP_ADMIN_KEY to an admin API key")
    headers = {"Authorization": f"Bearer {settings.bootstrap_admin_key.get_secret_value()}"}
    try:
        with httpx.Client(base_url=f"{server.rstrip('/')}/api/v1", headers=headers, timeout=timeout) as admin:
            yield admin
    except httpx.HTTPStatusError as exc:
        fail(f"the manager refused: {exc.response.status_code} {exc.response.text}")
    except httpx.HTTPError as exc:
        fail(f"cannot reach the manager at {server}: {exc}")


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


@admin.command("migrate")
def migrate_command() -> None:
    """Bring the database schema up to date."""
    settings = load_settings(Settings)
    guarded(lambda: migrate(make_engine(settings.resolved_database_url)), "migrating the database")
    stdout.print(f"database {describe(settings.resolved_database_url)} is up to date")


@admin.command("groups")
def show_groups() -> None:
    """The group tree, with inheritance and how many agents each group has."""
    from api.services.overview import group_tree

    settings = load_settings(Settings)
    rows = guarded(lambda: group_tree(make_engine(settings.resolved_database_url)), "reading groups")
    nodes: dict[int | None, Tree] = {}
    top = Tree("[bold]groups[/]")
    for row in rows:
        label = f"[bold]{row.name}[/] [dim]#{row.id}[/] " + (
            "[cyan]inherits[/]" if row.inherit else "[magenta]own policies[/]"
        )
        label += f" · {row.agents} agent(s)"
        nodes[row.id] = nodes.get(row.parent_id, top).add(label)
    stdout.print(top)


@admin.command("agents")
def show_agents(group: Annotated[int | None, typer.Option(help="only this group")] = None) -> None:
    """The fleet: who holds which serial, and who is out of date."""
    from api.services.overview import agent_rows

    settings = load_settings(Settings)
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
    stdout.print(table)
