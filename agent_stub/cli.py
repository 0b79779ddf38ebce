"""`policycast-agent`: enrol, run the agent (pull, and push when told), force an update, show the status.

The one place of the agent that reads the environment: `AgentSettings` is built here once and passed
down. Expected failures (manager down, token refused, not enrolled...) end with one line on stderr and
a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import signal
import socket
import ssl
from datetime import datetime
from pathlib import Path
from typing import Annotated, NoReturn

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent_stub import AGENT_VERSION, pidfile
from agent_stub.core import AgentCore
from agent_stub.errors import (
    AgentAlreadyRunningError,
    AgentNotRunningError,
    CorruptStateError,
    ManagerBadResponse,
    ManagerError,
    ManagerRejected,
    ManagerUnreachable,
    ManagerUntrusted,
    NotEnrolledError,
    TrustError,
)
from agent_stub.log_spool import LogSpool, spool_dir
from agent_stub.manager_client import ManagerClient, normalize_server
from agent_stub.runtime import AgentRuntime
from agent_stub.state import FileStateStore, Identity
from agent_stub.trust import context_for, pin, resolve_pin
from fabric_core.errors import InvalidDocument
from fabric_core.settings import AgentSettings
from fabric_core.signing import VerifyKey
from fabric_core.tls import TlsError
from fabric_core.wire import EnrollResponse

log = logging.getLogger(__name__)

# Locals are never shown: they would include the agent's secret.
app = typer.Typer(
    help="The Policycast reference agent.", no_args_is_help=True, pretty_exceptions_show_locals=False
)

StateDirOption = Annotated[
    Path | None, typer.Option("--state-dir", help="state directory [default: settings state_dir]")
]
LogLevelOption = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR")]


def main() -> None:
    app()


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"policycast-agent: {message}", err=True)
    raise typer.Exit(code)


@app.callback()
def _load_settings(ctx: typer.Context) -> None:
    try:
        ctx.obj = AgentSettings()
    except ValidationError as exc:
        _fail(f"invalid POLICYCAST_AGENT_* setting: {exc}", code=2)


def _settings(ctx: typer.Context, state_dir: Path | None) -> AgentSettings:
    settings: AgentSettings = ctx.obj
    return settings.model_copy(update={"state_dir": state_dir}) if state_dir else settings


def _load_core(store: FileStateStore) -> AgentCore:
    try:
        return AgentCore.from_store(store)
    except NotEnrolledError:
        _fail(f"not enrolled (no identity in {store.state_dir}); run `policycast-agent enroll` first")
    except (CorruptStateError, InvalidDocument) as exc:
        _fail(f"unusable identity in {store.state_dir}: {exc}; re-enrol with `enroll --force`")


# --- enroll ------------------------------------------------------------------------------------------


@app.command()
def enroll(
    ctx: typer.Context,
    *,
    server: Annotated[str, typer.Option(help="manager URL, e.g. https://manager.example:8000")],
    token: Annotated[
        str,
        typer.Option(
            help="join token (pcet_….sha256:…) from `policycast admin enroll-token`, or a bare token"
        ),
    ],
    ca_hash: Annotated[
        str | None,
        typer.Option("--ca-hash", help="the manager CA's hash to pin (sha256:…), if the token lacks it"),
    ] = None,
    insecure_http: Annotated[
        bool,
        typer.Option("--insecure-http", help="allow an http:// manager: secret and documents in clear"),
    ] = False,
    hostname: Annotated[str | None, typer.Option(help="name to report [default: this host's name]")] = None,
    state_dir: StateDirOption = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing identity")] = False,
) -> None:
    """Enrol this agent with a manager and store its identity.

    Over https:// the agent pins the manager's CA by the hash in the join token (or --ca-hash) before
    the token is sent, and from then on trusts only the CAs the manager names.
    """
    settings = _settings(ctx, state_dir)
    store = FileStateStore(settings.state_dir)
    _refuse_reenrolment(store, force=force)
    try:
        server = normalize_server(server)
        token, pinned = resolve_pin(token, ca_hash)
    except (ValueError, TrustError) as exc:
        _fail(str(exc))
    trusted = _settle_trust(server, pinned, insecure_http=insecure_http, timeout_s=settings.request_timeout_s)
    name = hostname or socket.gethostname()
    response = _call_enroll(
        server=server, token=token, hostname=name, timeout_s=settings.request_timeout_s, trusted=trusted
    )
    try:
        VerifyKey.from_base64(response.signing_key.kid, response.signing_key.public_key)
    except InvalidDocument as exc:
        _fail(f"the manager sent an unusable signing key: {exc}")
    identity = Identity.from_enrollment(server=server, response=response, hostname=name, trusted_cas=trusted)
    try:
        store.reset()  # a document of the old identity must not be trusted under the new one
        store.save_identity(identity)
    except OSError as exc:
        _fail(f"cannot write the identity to {settings.state_dir}: {exc}")
    pinned_text = f", trusting CA {pinned}" if trusted else ""
    typer.echo(
        f"enrolled as agent {identity.agent_id} in group {identity.group_id} ({settings.state_dir})"
        f"{pinned_text}"
    )


def _settle_trust(server: str, pinned: str | None, *, insecure_http: bool, timeout_s: float) -> list[str]:
    """The CA certificates to trust from now on: the pinned one as the server offers it (https://),
    nothing over http:// (allowed only with --insecure-http). Fails before anything secret is sent."""
    if server.startswith("http://"):
        if not insecure_http:
            _fail(
                f"refusing to enrol over plain HTTP ({server}): the agent's secret and documents would "
                "travel in clear; use the manager's https:// URL, or pass --insecure-http"
            )
        typer.echo(
            "policycast-agent: warning: enrolling over plain HTTP: the agent's secret and documents "
            "travel in clear, and anyone on the path can impersonate the manager",
            err=True,
        )
        return []
    if pinned is None:
        _fail(
            "no CA hash to pin: use the join token printed by `policycast admin enroll-token` "
            "(pcet_….sha256:…), or pass --ca-hash sha256:… (the manager prints it at start)"
        )
    try:
        return asyncio.run(pin(server, pinned, timeout_s=timeout_s))
    except TrustError as exc:
        _fail(str(exc))
    except ManagerUnreachable as exc:
        _fail(f"cannot reach the manager at {server}: {exc}")
    except ManagerError as exc:
        _fail(f"cannot fetch the CA of the manager at {server}: {exc}")


def _refuse_reenrolment(store: FileStateStore, *, force: bool) -> None:
    if force:
        return
    try:
        existing = store.load_identity()
    except CorruptStateError:
        return  # nothing worth keeping
    if existing is not None:
        _fail(
            f"already enrolled as agent {existing.agent_id} in {store.state_dir}; use --force to replace it"
        )


def _call_enroll(
    *, server: str, token: str, hostname: str, timeout_s: float, trusted: list[str]
) -> EnrollResponse:
    facts = {
        "os": platform.system(),
        "os_release": platform.release(),
        "arch": platform.machine(),
        "agent_version": AGENT_VERSION,
    }
    try:
        return asyncio.run(
            ManagerClient.enroll(
                server=server,
                token=token,
                hostname=hostname,
                facts=facts,
                timeout_s=timeout_s,
                ssl_context=context_for(trusted),
            )
        )
    except ValidationError as exc:
        _fail(f"invalid enrolment request: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
    except ManagerUntrusted as exc:
        _fail(
            f"the server at {server} does not prove it holds a certificate from the pinned CA "
            f"({exc}); the token was not sent and nothing was stored"
        )
    except ManagerBadResponse as exc:
        _fail(f"unexpected answer from the manager at {server}: {exc}")
    except ManagerUnreachable as exc:
        _fail(f"cannot reach the manager at {server}: {exc}")
    except ManagerRejected as exc:
        _fail(f"the manager refused the enrolment ({exc.status}): {exc.detail}")


# --- run ---------------------------------------------------------------------------------------------


@app.command()
def run(
    ctx: typer.Context,
    state_dir: StateDirOption = None,
    log_level: LogLevelOption = "INFO",
) -> None:
    """Run the agent until SIGTERM or Ctrl-C (SIGUSR1: update now; SIGUSR2: a security entry was logged).

    It heartbeats the manager at the interval, and keeps an MQTT session while its document says push.
    """
    settings = _settings(ctx, state_dir)
    level = logging.getLevelNamesMapping().get(log_level.upper())
    if level is None:
        _fail(f"unknown log level {log_level!r}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request is noise
    core = _load_core(FileStateStore(settings.state_dir))
    try:
        context_for(core.identity.trusted_cas)  # built (and kept) now, so a bad one fails here, cleanly
    except (TlsError, ssl.SSLError) as exc:
        _fail(f"unusable trusted CAs in {settings.state_dir}: {exc}; re-enrol with `enroll --force`")
    # `policycast-agent log` and `update-now` may signal as soon as the pid file exists, and until
    # _serve handles them (and after it stops) their default action would end the process. Ignoring
    # them meanwhile loses nothing: starting is a heartbeat, and it uploads what the log holds.
    _ignore_agent_signals()
    try:
        pid_file = pidfile.claim(settings.state_dir)
    except (AgentAlreadyRunningError, OSError) as exc:
        _fail(str(exc))
    try:
        asyncio.run(_serve(core, settings))
    finally:
        pidfile.release(pid_file)


def _ignore_agent_signals() -> None:
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


async def _serve(core: AgentCore, settings: AgentSettings) -> None:
    identity = core.identity
    log.info(
        "agent %s (group %d) starting against %s, holding serial %d",
        identity.agent_id,
        identity.group_id,
        identity.server,
        core.serial,
    )
    client = ManagerClient.for_agent(
        server=identity.server,
        agent_id=identity.agent_id,
        secret=identity.secret,
        timeout_s=settings.request_timeout_s,
        ssl_context=context_for(identity.trusted_cas),  # the pinned CAs only; none: plain HTTP
    )
    spool = LogSpool(
        spool_dir(settings.state_dir),
        max_entries=settings.log_spool_max_entries,
        batch_size=settings.log_batch_size,
    )
    runtime = AgentRuntime(
        core, client, settings, spool=spool, priority_delay_s=settings.log_priority_delay_s
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, runtime.update_now)
    loop.add_signal_handler(signal.SIGUSR2, runtime.logs.notice)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runtime.run(stop)
    finally:
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        _ignore_agent_signals()  # removing restored the defaults; the pid file is still there
        await client.aclose()
    log.info("agent %s stopped, holding serial %d", identity.agent_id, core.serial)


# --- update-now --------------------------------------------------------------------------------------


@app.command("update-now")
def update_now(ctx: typer.Context, state_dir: StateDirOption = None) -> None:
    """Ask the running agent to heartbeat at once."""
    settings = _settings(ctx, state_dir)
    try:
        pid = pidfile.running_pid(settings.state_dir)
        os.kill(pid, signal.SIGUSR1)
    except AgentNotRunningError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot signal the agent: {exc}")
    typer.echo(f"asked the agent (pid {pid}) to update now")


# --- log ---------------------------------------------------------------------------------------------


@app.command("log")
def log_entry(
    ctx: typer.Context,
    message: Annotated[str, typer.Argument(help="the message")],
    level: Annotated[
        str, typer.Option("--level", help="debug, info, warning, error, critical or security")
    ] = "info",
    category: Annotated[
        str, typer.Option("--category", help="what the entry is about, e.g. antivirus")
    ] = "agent",
    state_dir: StateDirOption = None,
) -> None:
    """Add an entry to the agent's log; heartbeats upload it (security entries within a minute)."""
    settings = _settings(ctx, state_dir)
    _load_core(FileStateStore(settings.state_dir))  # fails cleanly when not enrolled
    try:
        spool = LogSpool(spool_dir(settings.state_dir), max_entries=settings.log_spool_max_entries)
        entry = spool.append(level.lower(), message, category=category)
    except ValueError as exc:
        _fail(str(exc), code=2)
    except OSError as exc:
        _fail(f"cannot write to the log spool in {settings.state_dir}: {exc}")
    if entry.level == "security":
        _nudge_agent(settings.state_dir)


def _nudge_agent(state_dir: Path) -> None:
    """Tell a running agent that a security entry waits (best effort: it also looks when it starts)."""
    with contextlib.suppress(AgentNotRunningError, OSError):
        os.kill(pidfile.running_pid(state_dir), signal.SIGUSR2)


# --- status ------------------------------------------------------------------------------------------


@app.command()
def status(ctx: typer.Context, state_dir: StateDirOption = None) -> None:
    """Show who this agent is and what it enforces."""
    settings = _settings(ctx, state_dir)
    core = _load_core(FileStateStore(settings.state_dir))
    try:
        running = f"yes (pid {pidfile.running_pid(settings.state_dir)})"
    except AgentNotRunningError:
        running = "no"
    info = core.status
    table = Table(title=f"policycast agent ({settings.state_dir})", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("agent id", core.identity.agent_id),
        ("manager", core.identity.server),
        ("group", str(core.identity.group_id)),
        ("location", _text(core.location_id)),
        ("mode", core.mode),
        ("transport", _text(info.transport) if running != "no" else "-"),
        ("serial held", str(core.serial)),
        ("running", running),
        ("last heartbeat", _text(info.last_heartbeat_at)),
        ("next heartbeat", _text(info.next_heartbeat_at)),
        ("last error", _text(info.last_error)),
    ]
    for name, value in rows:
        table.add_row(name, Text(value))  # Text: an error message may hold [brackets]
    Console().print(table)


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return str(value)


# --- simulate ----------------------------------------------------------------------------------------


@app.command()
def simulate(
    ctx: typer.Context,
    *,
    agents: Annotated[int, typer.Option("--agents", min=1, help="how many agents to run")] = 100,
    server: Annotated[str, typer.Option(help="manager URL, e.g. http://127.0.0.1:8000")],
    admin_key: Annotated[
        str | None,
        typer.Option(
            "--admin-key", envvar="POLICYCAST_ADMIN_KEY", help="prepare groups and tokens by the admin API"
        ),
    ] = None,
    token: Annotated[
        list[str] | None,
        typer.Option("--token", help="join token (or bare token) of a group (repeat: agents spread)"),
    ] = None,
    ca_hash: Annotated[
        str | None, typer.Option("--ca-hash", help="the manager CA's hash to pin, if the tokens lack it")
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option("--ca-file", help="the manager's CA (PEM), trusted for the admin API and agents"),
    ] = None,
    mode: Annotated[
        str, typer.Option(help="push, pull or mix (every other group pulls); with --admin-key")
    ] = "push",
    groups: Annotated[
        int, typer.Option(min=1, help="groups sim-01.. to spread agents over (with --admin-key)")
    ] = 10,
    locations: Annotated[int, typer.Option(min=1, help="locations per group: Default, site-1, ...")] = 2,
    heartbeat_s: Annotated[
        int | None, typer.Option("--heartbeat-s", help="the groups' heartbeat interval")
    ] = None,
    connect_rate: Annotated[
        float, typer.Option("--connect-rate", min=1, help="MQTT connects per second")
    ] = 500.0,
    start_rate: Annotated[
        float | None, typer.Option("--start-rate", help="agents started per second")
    ] = None,
    identities: Annotated[
        Path | None, typer.Option(help="keep identities here and reuse them next time")
    ] = None,
    mqtt_url: Annotated[
        str | None, typer.Option("--mqtt-url", help="override the broker URL of every agent")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="seconds to run once ready [default: until Ctrl-C]")
    ] = None,
    summary: Annotated[Path | None, typer.Option(help="also write the JSON summary to this file")] = None,
    control: Annotated[
        bool, typer.Option("--control", help="JSON-lines requests on stdin (benchmarks)")
    ] = False,
    enrol_only: Annotated[
        bool, typer.Option("--enrol-only", help="enrol and keep the identities, then exit")
    ] = False,
    bare: Annotated[
        bool,
        typer.Option(
            "--bare", help="baseline: MQTT connect and subscribe only, no agent logic (with --admin-key)"
        ),
    ] = False,
    ready_timeout: Annotated[
        float, typer.Option("--ready-timeout", help="seconds to wait for the fleet")
    ] = 600.0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    loop: Annotated[
        str, typer.Option(help="event loop: auto (uvloop if installed), uvloop or asyncio")
    ] = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress on stderr")] = True,
    log_level: LogLevelOption = "WARNING",
) -> None:
    """Run many agents in this process (the real agent logic, state in memory); print a JSON summary."""
    from agent_stub.simulator import run as sim
    from agent_stub.simulator.plan import FleetPlan

    level = logging.getLevelNamesMapping().get(log_level.upper())
    if level is None:
        _fail(f"unknown log level {log_level!r}")
    if mode not in ("push", "pull", "mix") or loop not in ("auto", "uvloop", "asyncio"):
        _fail("--mode is push, pull or mix; --loop is auto, uvloop or asyncio")
    if not token and not admin_key:
        _fail("give --admin-key (groups and tokens are prepared) or at least one --token")
    if bare and not admin_key:
        _fail("--bare needs --admin-key (it looks up the locations of its agents)")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
    try:
        plan = FleetPlan(
            agents=agents,
            server=normalize_server(server),
            admin_key=admin_key,
            tokens=tuple(token or ()),
            mode=mode,  # type: ignore[arg-type]  # checked above
            groups=groups,
            locations=locations,
            heartbeat_s=heartbeat_s,
            connect_rate=connect_rate,
            start_rate=start_rate,
            identities=identities,
            mqtt_url=mqtt_url,
            seed=seed,
            ready_timeout_s=ready_timeout,
            loop=loop,  # type: ignore[arg-type]  # checked above
            bare=bare,
            ca_hash=ca_hash,
            ca_file=ca_file,
        )
        options = sim.RunOptions(
            duration_s=duration,
            control=control,
            summary_path=summary,
            progress=progress,
            enrol_only=enrol_only,
        )
        result = sim.run(plan, ctx.obj, options)
    except (ValueError, TrustError) as exc:
        _fail(str(exc))
    except (ManagerError, RuntimeError) as exc:
        _fail(f"simulation failed: {exc}")
    except httpx.HTTPError as exc:  # the admin API (agents' requests raise ManagerError)
        hint = " (give --ca-file or --ca-hash: the manager's CA)" if "CERTIFICATE_VERIFY" in str(exc) else ""
        _fail(f"simulation failed: the admin API: {type(exc).__name__}: {exc}{hint}")
    if not control:
        typer.echo(json.dumps(result, indent=2))
