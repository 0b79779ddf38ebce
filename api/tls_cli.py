"""`policycast admin tls`: the CAs agents trust, and a rotation of the manager's own CA.

Run where the manager's data directory and database are (they hold the CA's key and the trusted CAs).
A rotation: `prepare-ca` (a new CA, trusted at once: every document names it), wait until every agent
is up to date, `promote-ca` (the new CA issues from now on: restart `policycast serve` and rerun
`policycast broker-config`), then `retire-ca` the old one. docs/operations.md, "TLS", says more.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from sqlmodel import Session

from api.errors import ServiceError
from api.services import trust
from api.services.change import Change
from fabric_core.console import fail, load_settings, stdout
from fabric_core.settings import Settings
from fabric_core.signing import load_signing_key
from fabric_core.tls import TlsError, ca_hash, manager_trust, prepare_next_ca, promote_next_ca
from manager_db.database import guarded as guarded_database
from manager_db.database import make_engine, session_scope

tls = typer.Typer(help="The CAs agents trust, and a rotation of the manager's CA.", no_args_is_help=True)
T = TypeVar("T")


def guarded(action: Callable[[], T], what: str) -> T:
    """`manager_db.database.guarded`, and a refused change (an unknown CA, the only one, a malformed
    hash or certificate) as one line and exit 1, like any operator error."""
    try:
        return guarded_database(action, what)
    except ServiceError as exc:
        fail(f"{what}: {exc.detail}")
    except TlsError as exc:
        fail(f"{what}: {exc}")


@tls.command("list")
def list_cas() -> None:
    """The CAs every document names, and the one that issues the servers' certificates."""
    settings = load_settings(Settings)

    def read() -> tuple[list[tuple[str, str]], str | None]:
        issuing = _issuing(settings)
        with Session(make_engine(settings.resolved_database_url)) as session:
            return [(row.sha256, f"{row.added_at:%Y-%m-%d %H:%M}") for row in trust.trusted(session)], issuing

    rows, issuing = guarded(read, "reading the trusted CAs")
    # One line each, not a table: a hash is 71 characters and must stay whole, to copy into retire-ca.
    stdout.print(f"{len(rows)} trusted CA(s), oldest first:")
    for digest, added in rows:
        role = "   issues the servers' certificates" if digest == issuing else ""
        stdout.print(f"  {digest}   added {added}{role}", soft_wrap=True, highlight=False)


@tls.command("trust-ca")
def trust_file(pem: Annotated[Path, typer.Argument(help="a CA certificate (PEM)", exists=True)]) -> None:
    """Trust another CA (an operator's own, before its certificates replace the manager's)."""
    settings = load_settings(Settings)
    digest = guarded(lambda: _trust(settings, pem.read_bytes()), "trusting the CA")
    stdout.print(f"trusted {digest}: every document names it from now on")


@tls.command("prepare-ca")
def prepare() -> None:
    """Make the CA that will succeed the manager's, and trust it at once (agents learn it)."""
    settings = load_settings(Settings)
    digest = guarded(lambda: _trust(settings, prepare_next_ca(settings).certificate_pem), "preparing a CA")
    stdout.print(
        f"prepared and trusted {digest}. When `policycast admin agents` shows every agent up to date, "
        "run `policycast admin tls promote-ca`.",
        soft_wrap=True,
    )


@tls.command("promote-ca")
def promote() -> None:
    """Let the prepared CA issue the servers' certificates from their next start."""
    settings = load_settings(Settings)
    old, new = guarded(lambda: promote_next_ca(settings), "promoting the CA")
    stdout.print(
        f"{new.hash} issues certificates now (was {old.hash}). Restart `policycast serve`, rerun "
        "`policycast broker-config` and restart the broker; then "
        f"`policycast admin tls retire-ca {old.hash}`.",
        soft_wrap=True,
    )


@tls.command("retire-ca")
def retire(sha256: Annotated[str, typer.Argument(help="the CA's hash, sha256:…")]) -> None:
    """Stop trusting a CA: documents no longer name it, and agents drop it."""
    settings = load_settings(Settings)

    def apply() -> None:
        with session_scope(make_engine(settings.resolved_database_url)) as session:
            change = _cli_change(settings, session)
            trust.retire_ca(change, sha256=sha256)
            change.commit()

    guarded(apply, "retiring the CA")
    stdout.print(f"retired {sha256}")


def _issuing(settings: Settings) -> str | None:
    """The hash of the CA the servers' certificates come from, read (never made); None if there is none."""
    try:
        return ca_hash(manager_trust(settings))
    except TlsError:
        return None


def _trust(settings: Settings, pem: bytes) -> str:
    with session_scope(make_engine(settings.resolved_database_url)) as session:
        change = _cli_change(settings, session)
        trust.trust_ca(change, pem=pem)
        change.commit()
    return ca_hash(pem)


def _cli_change(settings: Settings, session: Session) -> Change:
    """A change made from the command line (audited as `cli:tls`); other processes see it within
    `cache_refresh_s`, as any change."""
    return Change(session=session, actor="cli:tls", signing_key=load_signing_key(settings, create=False))
