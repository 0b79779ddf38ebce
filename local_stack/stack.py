"""`policycast up`: the whole local stack in one process, for a laptop and for a first look.

It serves the manager on SQLite, starts a broker when one is installed, seeds a few demo groups and
policies (once), enrols demo agents that run the real agent logic against the real HTTP API, and
shows them converging on a policy change. Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import logging
import signal
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from pydantic import SecretStr
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from broker_bridge.errors import BrokerUnavailable
from broker_bridge.service import BridgeThread
from fabric_core.settings import Settings
from fabric_core.tls import client_context
from local_stack.demo import DEMO_HEARTBEAT_S, AgentFleet, Demo, enrol_agents, forget_stale_agents, ok, seed
from local_stack.local_broker import LocalBroker, choose_engine, start_broker
from local_stack.manager import ManagerThread, admin_key_for, pick_port, start_bridge

log = logging.getLogger(__name__)

CONVERGE_TIMEOUT_S = 60.0


def fleet_table(agents: list[dict[str, Any]], group_names: dict[int, str], title: str) -> Table:
    table = Table(title=title, title_justify="left", expand=False)
    for column in ("host", "group", "mode", "serial held", "current", "state", "last seen"):
        table.add_column(column)
    now = datetime.now(UTC)
    for agent in sorted(agents, key=lambda a: a["hostname"]):
        seen = agent["last_seen"]
        ago = "never" if seen is None else f"{(now - datetime.fromisoformat(seen)).total_seconds():.0f}s ago"
        state = "[green]up to date[/]" if agent["up_to_date"] else "[yellow]waiting for heartbeat[/]"
        table.add_row(
            agent["hostname"],
            group_names.get(agent["group_id"], str(agent["group_id"])),
            agent["mode"],
            str(agent["serial"]),
            str(agent["current_serial"]),
            state,
            ago,
        )
    return table


def run_stack(
    settings: Settings,
    *,
    agents: int,
    port: int,
    exit_when_converged: bool,
    console: Console,
    engine: str | None = None,
    broker_nodes: int = 1,
) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the stack as cleanly as Ctrl-C does
    key = admin_key_for(settings)
    settings = settings.model_copy(update={"bootstrap_admin_key": SecretStr(key)})
    chosen = _api_port(port, console)
    console.print(f"[bold]Policycast[/] starting: data in {settings.data_dir.resolve()}")
    try:
        settings, broker = _start_broker(settings, console, engine=engine, nodes=broker_nodes)
    except (ValueError, BrokerUnavailable) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    manager = ManagerThread(settings, chosen)
    bridge: BridgeThread | None = None
    fleet: AgentFleet | None = None
    admin = httpx.Client(
        base_url=f"{manager.url}/api/v1",
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
        verify=client_context(manager.trust_pem) if manager.trust_pem else True,
    )
    try:
        manager.start()
        if broker is not None:
            bridge = start_bridge(settings, manager)
        demo = seed(admin, push=broker is not None)
        agents_dir = settings.data_dir / "demo-agents"
        forget_stale_agents(admin, agents_dir, manager.url, broker.urls if broker else None)
        state_dirs = enrol_agents(admin, manager.url, demo, agents, agents_dir)
        fleet = AgentFleet(state_dirs)
        fleet.start()
        _announce(console, manager, broker, key, settings, agents)
        names = {g["id"]: g["name"] for g in ok(admin.get("/groups"))}
        if agents and not _converge(
            admin, names, fleet.agent_ids, console, "agents fetching their first documents"
        ):
            return 1
        if agents:
            version = _change_policy(admin, demo)
            console.print(
                "[bold]Operator change:[/] edited the shared policy 'Corporate firewall' "
                f"(now version {version}); every group using it gets a new document"
            )
            if not _converge(
                admin,
                names,
                fleet.agent_ids,
                console,
                f"policy version {version} reaching every agent",
                report=True,
            ):
                return 1
        if exit_when_converged:
            return 0
        console.print("Running. Press Ctrl-C to stop.  Try: .venv/bin/policycast admin agents")
        _watch(admin, names, fleet.agent_ids, console)
        return 0
    except KeyboardInterrupt:
        return 0
    except (httpx.HTTPError, RuntimeError, BrokerUnavailable) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    finally:
        console.print("stopping ...")
        if fleet is not None:
            fleet.stop()
        if bridge is not None:
            bridge.stop()
        admin.close()
        manager.stop()
        if broker is not None:
            broker.stop()
        console.print("stopped")


def _api_port(port: int, console: Console) -> int:
    chosen = pick_port(port)
    if port and chosen != port:
        console.print(f"[yellow]port {port} is taken; using {chosen}[/]")
    for noisy in ("agent_stub", "httpx", "broker_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return chosen


def _start_broker(
    settings: Settings, console: Console, *, engine: str | None, nodes: int
) -> tuple[Settings, LocalBroker | None]:
    """The broker (None: none installed, push off) and the settings that use it."""
    settings = choose_engine(settings, console, engine=engine)
    broker = start_broker(settings, console, nodes=nodes)
    return settings.model_copy(update=broker.settings_update if broker else {"mqtt_enabled": False}), broker


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _announce(
    console: Console,
    manager: ManagerThread,
    broker: LocalBroker | None,
    key: str,
    settings: Settings,
    agents: int,
) -> None:
    console.print(_banner(manager, broker, key, settings, agents))
    if manager.ca_hash:  # whole, on a line of its own: agents and curl users pin it
        console.print(f"agents pin the CA {manager.ca_hash}", soft_wrap=True)


def _banner(
    manager: ManagerThread, broker: LocalBroker | None, key: str, settings: Settings, agents: int
) -> Panel:
    return Panel.fit(
        f"manager   {manager.url}   (API docs: {manager.url}/docs)\n"
        f"console   {manager.url}/console   (sign in with the admin key)\n"
        f"CA        {settings.tls_dir / 'ca.pem' if manager.ca_hash else 'none: plain HTTP'}\n"
        f"admin key {key}\n"
        f"database  {settings.resolved_database_url}\n"
        f"broker    {broker.describe() if broker else 'none: pull only'}\n"
        f"agents    {agents}: push in Headquarters, pull elsewhere (heartbeat {DEMO_HEARTBEAT_S}-"
        f"{DEMO_HEARTBEAT_S * 2}s)",
        title="local stack",
    )


def _fleet(admin: httpx.Client, fleet_ids: set[str]) -> list[dict[str, Any]]:
    """The operator's view of the demo agents (not of agents enrolled by earlier runs)."""
    return [a for a in ok(admin.get("/agents", params={"limit": 1000})) if a["id"] in fleet_ids]


def _converge(
    admin: httpx.Client,
    names: dict[int, str],
    fleet_ids: set[str],
    console: Console,
    what: str,
    *,
    report: bool = False,
) -> bool:
    """Show the fleet until every agent holds its serial; with `report`, say how long each mode took."""
    started = time.monotonic()
    landed: dict[str, float] = {}
    deadline = started + CONVERGE_TIMEOUT_S
    with Live(console=console, refresh_per_second=4, transient=not console.is_terminal) as live:
        while True:
            agents = _fleet(admin, fleet_ids)
            for agent in agents:
                if agent["up_to_date"]:
                    landed.setdefault(agent["id"], time.monotonic() - started)
            done = sum(1 for a in agents if a["up_to_date"])
            live.update(fleet_table(agents, names, f"{what}: {done}/{len(agents)} up to date"))
            if agents and done == len(agents):
                break
            if time.monotonic() > deadline:
                console.print(f"[red]not every agent converged within {CONVERGE_TIMEOUT_S:.0f}s[/]")
                return False
            time.sleep(0.2)
    if not console.is_terminal:
        console.print(fleet_table(agents, names, f"{what}: {done}/{len(agents)} up to date"))
    if report:
        for mode in ("push", "pull"):
            times = [landed[a["id"]] for a in agents if a["mode"] == mode]
            if times:
                console.print(f"[green]{len(times)} {mode} agent(s) applied it within {max(times):.1f}s[/]")
    return True


def _change_policy(admin: httpx.Client, demo: Demo) -> int:
    policy_id = demo.firewall_policy_id
    body = ok(admin.get(f"/policies/{policy_id}"))["body"]
    body["allow"] = [*body.get("allow", []), f"tcp/{8000 + len(body.get('allow', []))}"]
    return int(ok(admin.put(f"/policies/{policy_id}", json={"body": body}))["version"])


def _watch(admin: httpx.Client, names: dict[int, str], fleet_ids: set[str], console: Console) -> None:
    with Live(console=console, refresh_per_second=2) as live:
        while True:
            agents = _fleet(admin, fleet_ids)
            done = sum(1 for a in agents if a["up_to_date"])
            live.update(Group(fleet_table(agents, names, f"fleet: {done}/{len(agents)} up to date")))
            time.sleep(1)
