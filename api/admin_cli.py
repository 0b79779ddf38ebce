"""`policycast admin`: API keys, enrolment tokens, content, the database and the fleet at a glance."""

from __future__ import annotations

import getpass
import ssl
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree
from sqlmodel import Session

from fabric_core.console import fail, load_settings, stderr, stdout
from fabric_core.settings import Settings
from manager_db.database import describe, guarded, make_engine, migrate
from manager_db.models import as_utc

if TYPE_CHECKING:
    import httpx

    from api.services.change import Change

admin = typer.Typer(
    help="Administration: API keys, the database, the fleet at a glance.", no_args_is_help=True
)


class RoleChoice(StrEnum):
    admin = "admin"
    viewer = "viewer"


DEFAULT_SERVER = "https://127.0.0.1:8080"
ServerOption = Annotated[str, typer.Option(help="the manager's URL")]
CaFileOption = Annotated[
    Path | None,
    typer.Option(
        help="the CA to verify the manager with [default: the data directory's, or the system's]",
        exists=True,
        dir_okay=False,
    ),
]

keys = typer.Typer(
    help="API keys: list, create, revoke; retire the bootstrap key. Works directly on the database.",
    no_args_is_help=True,
)
admin.add_typer(keys, name="keys")
T = TypeVar("T")
MAX_EXPIRES_IN_S = 365 * 86400


def _on_database(work: Callable[[Session], T], what: str) -> T:
    """Run `work` on a session of the settings' database (migrated first); one-line failures for what an
    operator can fix, among them a refused change (an unknown key, one already revoked)."""
    from api.errors import ServiceError

    settings = load_settings(Settings)

    def run() -> T:
        engine = make_engine(settings.resolved_database_url)
        try:
            migrate(engine)
            with Session(engine, expire_on_commit=False) as session:
                return work(session)
        finally:
            engine.dispose()

    try:
        return guarded(run, what)
    except ServiceError as exc:
        fail(f"{what}: {exc.detail}")


def _change(session: Session) -> Change:
    """A change made from the command line: audited as `cli:<user>`, no document recomputed."""
    from api.services.change import Change

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name in the environment or the password database
        user = "unknown"
    return Change(session=session, actor=f"cli:{user}"[:128], signing_key=None)


@keys.command("create")
def create_key(
    role: Annotated[
        RoleChoice, typer.Option(help="admin may change state, viewer may only read")
    ] = RoleChoice.admin,
    name: Annotated[str, typer.Option(help="who or what the key is for")] = "operator",
    expires_in_s: Annotated[
        int | None,
        typer.Option(min=60, max=MAX_EXPIRES_IN_S, help="lifetime in seconds (default: never expires)"),
    ] = None,
) -> None:
    """Create an API key and print it, alone, on stdout (it is stored hashed: save it now)."""
    from api.services import api_keys

    name = name.strip()
    if not 1 <= len(name) <= 128 or "\x00" in name:
        fail("--name must be 1 to 128 characters")

    def create(session: Session) -> str:
        change = _change(session)
        key, _ = api_keys.create_key(change, role=role.value, name=name, expires_in_s=expires_in_s)
        change.commit()
        return key

    key = _on_database(create, "creating the key")
    sys.stdout.write(key + "\n")


admin.command("create-key", help="Same as `policycast admin keys create`.")(create_key)


@keys.command("list")
def list_keys() -> None:
    """Every API key (never a secret): role, name, created, last used, expires, revoked (times in UTC)."""
    from api.services import api_keys

    rows, retired = _on_database(
        lambda session: (api_keys.list_keys(session), api_keys.bootstrap_retirement(session)), "listing keys"
    )
    table = Table(title=f"{len(rows)} API key(s), times in UTC")
    for column in ("id", "name", "role", "created", "last used", "expires", "revoked"):
        table.add_column(column, no_wrap=column in ("id", "role"))
    now = datetime.now(UTC)
    for row in rows:
        expires_at, revoked_at = as_utc(row.expires_at), as_utc(row.revoked_at)
        if expires_at is None:
            expires = "never"
        elif expires_at <= now:
            expires = f"[yellow]{_when(expires_at)} (expired)[/]"
        else:
            expires = _when(expires_at)
        table.add_row(
            str(row.id),
            escape(row.name),
            row.role if revoked_at is None else f"[dim]{row.role}[/]",
            _when(as_utc(row.created_at)),
            _when(as_utc(row.last_used_at)) if row.last_used_at else "never",
            expires,
            "[green]no[/]" if revoked_at is None else f"[red]{_when(revoked_at)}[/]",
        )
    stdout.print(table)
    if retired is None:
        stdout.print(
            "bootstrap key: accepted wherever POLICYCAST_BOOTSTRAP_ADMIN_KEY is set (not retired)",
            soft_wrap=True,
        )
    else:
        stdout.print(
            f"bootstrap key: [red]retired[/] {_when(as_utc(retired.retired_at))} "
            f"by {escape(retired.retired_by)}",
            soft_wrap=True,
        )


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


@keys.command("revoke")
def revoke_key(key_id: Annotated[int, typer.Argument(min=1, help="the key's id (see keys list)")]) -> None:
    """Revoke an API key: every manager refuses it within POLICYCAST_CACHE_REFRESH_S."""
    from api.services import api_keys

    def revoke(session: Session) -> str:
        change = _change(session)
        row = api_keys.revoke_key(change, key_id=key_id)
        change.commit()
        return row.name

    name = _on_database(revoke, f"revoking API key {key_id}")
    stdout.print(
        f"revoked API key {key_id} ({escape(name)}): every manager refuses it within a cache refresh",
        soft_wrap=True,
    )


@keys.command("retire-bootstrap")
def retire_bootstrap() -> None:
    """Retire POLICYCAST_BOOTSTRAP_ADMIN_KEY: every manager refuses it from now on, even where the
    environment still sets it. Needs an active admin key to take its place."""
    from api.services import api_keys

    def retire(session: Session) -> None:
        change = _change(session)
        api_keys.retire_bootstrap(change)
        change.commit()

    _on_database(retire, "retiring the bootstrap key")
    stdout.print(
        "retired the bootstrap admin key: every manager refuses it within a cache refresh; "
        "remove POLICYCAST_BOOTSTRAP_ADMIN_KEY from their environment",
        soft_wrap=True,
    )


@admin.command("enroll-token")
def enroll_token(
    server: ServerOption = DEFAULT_SERVER,
    ca_file: CaFileOption = None,
    group: Annotated[
        str, typer.Option(help="group name (created under the root if --create)")
    ] = "My Company",
    create: Annotated[bool, typer.Option(help="create the group if it does not exist")] = False,
    mode: Annotated[str | None, typer.Option(help="with --create: push or pull for the new group")] = None,
    max_uses: Annotated[int | None, typer.Option(min=1, help="how many agents may use it")] = None,
) -> None:
    """Ask a running manager for an enrolment token (with POLICYCAST_BOOTSTRAP_ADMIN_KEY); print it alone.

    It is a join token: the token and the hash of the manager's CA, which `policycast-agent enroll`
    checks the manager against before it sends the token."""
    with _admin_api(server, ca_file, timeout=10) as admin:
        group_id = _group_id(admin, group, create=create, mode=mode)
        response = admin.post(f"/groups/{group_id}/enrollment-tokens", json={"max_uses": max_uses})
        response.raise_for_status()
    sys.stdout.write(response.json()["join_token"] + "\n")


@admin.command("publish-content")
def publish_content(
    directory: Annotated[
        Path, typer.Argument(help="the files of the new revision", exists=True, file_okay=False)
    ],
    kind: Annotated[str, typer.Option(help="content kind, e.g. definitions")] = "definitions",
    server: ServerOption = DEFAULT_SERVER,
    ca_file: CaFileOption = None,
) -> None:
    """Publish DIRECTORY as the next revision of a content kind, uploading only the files the manager
    does not have yet (with POLICYCAST_BOOTSTRAP_ADMIN_KEY)."""
    import hashlib

    from rich.progress import Progress

    listed = []
    with _admin_api(server, ca_file, timeout=60) as admin:
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
def _admin_api(server: str, ca_file: Path | None, *, timeout: float) -> Iterator[httpx.Client]:
    """A running manager's admin API with POLICYCAST_BOOTSTRAP_ADMIN_KEY; its failures as one line."""
    import httpx

    settings = load_settings(Settings)
    if settings.bootstrap_admin_key is None:
        fail("set POLICYCAST_BOOTSTRAP_ADMIN_KEY to an admin API key")
    headers = {"Authorization": f"Bearer {settings.bootstrap_admin_key.get_secret_value()}"}
    base_url = f"{server.rstrip('/')}/api/v1"
    try:
        with httpx.Client(
            base_url=base_url, headers=headers, timeout=timeout, verify=_verify(settings, ca_file)
        ) as admin:
            yield admin
    except httpx.HTTPStatusError as exc:
        fail(f"the manager refused: {exc.response.status_code} {exc.response.text}")
    except httpx.HTTPError as exc:
        fail(f"cannot reach the manager at {server}: {exc}")


def _verify(settings: Settings, ca_file: Path | None) -> ssl.SSLContext | bool:
    """Trust exactly the manager's CA: the file given, else the data directory's (or the operator's
    POLICYCAST_TLS_CA_FILE); the system's store only when neither is there (a manager behind a proxy
    with a public certificate)."""
    from fabric_core.tls import TlsError, client_context, manager_trust

    try:
        trusted = ca_file.read_bytes() if ca_file is not None else manager_trust(settings)
    except TlsError:
        return True
    except OSError as exc:
        fail(f"cannot read the CA file {ca_file}: {exc}")
    return client_context(trusted)


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
