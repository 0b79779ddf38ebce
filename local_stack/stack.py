"""`policycast up`: the whole local stack in one process, for a laptop and for a first look.

It serves the manager on SQLite, seeds a few demo groups and policies (once), enrols demo pull agents
that run the real agent logic (`agent_stub`) against the real HTTP API, and shows them converging on a
policy change. Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from pydantic import SecretStr
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from agent_stub.core import AgentCore
from agent_stub.manager_client import ManagerClient
from agent_stub.runtime import AgentRuntime
from agent_stub.state import FileStateStore, Identity
from api.deps import Fabric
from api.main import create_app
from broker_bridge.broker import BrokerUnavailable
from broker_bridge.credentials import bridge_password
from broker_bridge.mosquitto import (
    BrokerLayout,
    MosquittoProcess,
    find_dynsec_plugin,
    mosquitto_binary,
    write_broker_files,
)
from broker_bridge.service import Bridge, BridgeThread, connect_link
from fabric_core.settings import AgentSettings, Settings
from fabric_core.signing import load_signing_key

log = logging.getLogger(__name__)

DEMO_HEARTBEAT_S = 5
CONVERGE_TIMEOUT_S = 60.0
DEMO_GROUPS = (
    # name, inherits, communication of its own (push needs a broker; without one it stays pull)
    ("Headquarters", False, {"mode": "push", "heartbeat_s": 60}),
    ("Branch Offices", False, {"heartbeat_s": DEMO_HEARTBEAT_S * 2}),
    ("Laptops", True, None),
)


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as uvicorn does: TIME_WAIT is no obstacle
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def pick_port(port: int) -> int:
    if port and port_is_free(port):
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def admin_key_for(settings: Settings) -> str:
    """The bootstrap key from settings, or one made for this data directory and kept there (0600)."""
    if settings.bootstrap_admin_key is not None:
        return settings.bootstrap_admin_key.get_secret_value()
    path = settings.data_dir / "admin_key"
    if path.exists():
        return path.read_text().strip()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    key = f"pck_{secrets.token_urlsafe(32)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


class ManagerThread:
    """The manager's uvicorn server on a background thread of this process."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="manager", daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the manager did not start; see the messages above")
            time.sleep(0.05)

    @property
    def fabric(self) -> Fabric:
        fabric: Fabric = self.app.state.fabric
        return fabric

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class Demo:
    """The demo fleet's shape, as seeded through the admin API."""

    group_ids: dict[str, int]
    firewall_policy_id: int


def seed(admin: httpx.Client, *, push: bool) -> Demo:
    """Create the demo groups and policies once; later runs find and reuse them."""
    groups = {g["name"]: g for g in _ok(admin.get("/groups"))}
    root = next(g for g in groups.values() if g["parent_id"] is None)
    policies = {p["name"]: p for p in _ok(admin.get("/policies"))}
    if "Corporate firewall" not in policies:
        _ok(
            admin.put(
                f"/groups/{root['id']}/communication", json={"mode": "pull", "heartbeat_s": DEMO_HEARTBEAT_S}
            )
        )
        firewall = _ok(
            admin.post(
                "/policies",
                json={
                    "name": "Corporate firewall",
                    "type": "firewall",
                    "body": {"default": "deny", "allow": []},
                },
            )
        )
        antivirus = _ok(
            admin.post(
                "/policies",
                json={"name": "Antivirus standard", "type": "antivirus", "body": {"scan": "daily"}},
            )
        )
        for policy in (firewall, antivirus):
            _ok(
                admin.put(f"/groups/{root['id']}/policies/{policy['type']}", json={"policy_id": policy["id"]})
            )
        policies = {p["name"]: p for p in _ok(admin.get("/policies"))}
    for name, inherits, communication in DEMO_GROUPS:
        if name not in groups:
            groups[name] = _ok(
                admin.post("/groups", json={"name": name, "parent_id": root["id"], "inherit": inherits})
            )
        if communication and not inherits:
            wanted = {**communication, "mode": communication.get("mode", "pull") if push else "pull"}
            _ok(admin.put(f"/groups/{groups[name]['id']}/communication", json=wanted))
    return Demo(
        group_ids={name: groups[name]["id"] for name, _, _ in DEMO_GROUPS},
        firewall_policy_id=policies["Corporate firewall"]["id"],
    )


def enrol_agents(
    admin: httpx.Client, manager_url: str, demo: Demo, count: int, agents_dir: Path
) -> list[Path]:
    """State directories of `count` enrolled demo agents, spread over the demo groups."""
    names = list(demo.group_ids)
    dirs = []
    for index in range(count):
        state_dir = agents_dir / f"agent-{index + 1:02d}"
        store = FileStateStore(state_dir)
        if store.load_identity() is None:
            group_id = demo.group_ids[names[index % len(names)]]
            token = _ok(admin.post(f"/groups/{group_id}/enrollment-tokens", json={"max_uses": 1}))["token"]
            hostname = f"demo-{index + 1:02d}"
            response = asyncio.run(
                ManagerClient.enroll(server=manager_url, token=token, hostname=hostname, facts={"demo": True})
            )
            store.save_identity(
                Identity.from_enrollment(server=manager_url, response=response, hostname=hostname)
            )
        dirs.append(state_dir)
    return dirs


@dataclass
class AgentFleet:
    """Demo agents: the real agent runtime (pull, and push where the document says so), one asyncio task
    each, all on one background thread."""

    state_dirs: list[Path]
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    thread: threading.Thread | None = None
    stop_event: asyncio.Event | None = None

    def start(self) -> None:
        ready = threading.Event()

        async def main() -> None:
            self.stop_event = asyncio.Event()
            settings = AgentSettings(retry_min_s=0.5, retry_max_s=DEMO_HEARTBEAT_S)
            clients, runs = [], []
            for state_dir in self.state_dirs:
                core = AgentCore.from_store(FileStateStore(state_dir))
                own = settings.model_copy(update={"state_dir": state_dir})  # its own content store
                client = ManagerClient.for_agent(
                    server=core.identity.server,
                    agent_id=core.identity.agent_id,
                    secret=core.identity.secret,
                    timeout_s=settings.request_timeout_s,
                )
                clients.append(client)
                runtime = AgentRuntime(core, client, own, hostname=core.identity.hostname)
                runs.append(runtime.run(self.stop_event))
            ready.set()
            try:
                await asyncio.gather(*runs)
            finally:
                for client in clients:
                    await client.aclose()

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        ready.wait(timeout=30)

    def stop(self) -> None:
        if self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        if self.thread is not None:
            self.thread.join(timeout=10)


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


@dataclass
class LocalBroker:
    """Mosquitto started by Policycast with its own configuration, in the data directory."""

    process: MosquittoProcess
    url: str


def start_broker(settings: Settings, console: Console) -> LocalBroker | None:
    """A Mosquitto on a port kept from run to run (agents remember it), or None when not installed."""
    try:
        mosquitto_binary()
        plugin = find_dynsec_plugin()
    except BrokerUnavailable as exc:
        console.print(
            f"[yellow]No Mosquitto here ({exc}): push mode is off and every agent pulls.[/]\n"
            "[yellow]Install it (apt-get install -y mosquitto) to see push agents.[/]"
        )
        return None
    layout = BrokerLayout(settings.data_dir / "broker")
    port_file = layout.directory / "port"
    remembered = int(port_file.read_text()) if port_file.exists() else 0
    port = remembered if remembered and port_is_free(remembered) else pick_port(0)
    write_broker_files(
        layout=layout,
        port=port,
        bind="127.0.0.1",
        bridge_username=settings.mqtt_username,
        bridge_password=bridge_password(settings, load_signing_key(settings)),
        prefix=settings.mqtt_prefix,
        plugin_path=plugin,
    )
    port_file.write_text(f"{port}\n")
    process = MosquittoProcess(layout, port)
    process.start()
    return LocalBroker(process, f"mqtt://127.0.0.1:{port}")


def forget_stale_agents(agents_dir: Path, broker_url: str | None) -> None:
    """Demo agents enrolled against another broker address re-enrol (they are demo agents only)."""
    if not agents_dir.is_dir():
        return
    for state_dir in agents_dir.iterdir():
        identity = FileStateStore(state_dir).load_identity() if state_dir.is_dir() else None
        known = identity.mqtt.url if identity is not None and identity.mqtt is not None else None
        if identity is not None and known != broker_url:
            shutil.rmtree(state_dir)


def run_stack(
    settings: Settings, *, agents: int, port: int, exit_when_converged: bool, console: Console
) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the stack as cleanly as Ctrl-C does
    key = admin_key_for(settings)
    settings = settings.model_copy(update={"bootstrap_admin_key": SecretStr(key)})
    chosen = pick_port(port)
    if port and chosen != port:
        console.print(f"[yellow]port {port} is taken; using {chosen}[/]")
    for noisy in ("agent_stub", "httpx", "broker_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    console.print(f"[bold]Policycast[/] starting: data in {settings.data_dir.resolve()}")
    broker = start_broker(settings, console)
    settings = settings.model_copy(
        update={"mqtt_url": broker.url, "mqtt_enabled": True} if broker else {"mqtt_enabled": False}
    )
    manager = ManagerThread(settings, chosen)
    bridge: BridgeThread | None = None
    fleet: AgentFleet | None = None
    admin = httpx.Client(
        base_url=f"{manager.url}/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    try:
        manager.start()
        if broker is not None:
            bridge = start_bridge(settings, manager)
        demo = seed(admin, push=broker is not None)
        agents_dir = settings.data_dir / "demo-agents"
        forget_stale_agents(agents_dir, broker.url if broker else None)
        state_dirs = enrol_agents(admin, manager.url, demo, agents, agents_dir)
        fleet = AgentFleet(state_dirs)
        fleet.start()
        console.print(_banner(manager, broker, key, settings, agents))
        names = {g["id"]: g["name"] for g in _ok(admin.get("/groups"))}
        if agents and not _converge(admin, names, console, "agents fetching their first documents"):
            return 1
        if agents:
            version = _change_policy(admin, demo)
            console.print(
                "[bold]Operator change:[/] edited the shared policy 'Corporate firewall' "
                f"(now version {version}); every group using it gets a new document"
            )
            if not _converge(
                admin, names, console, f"policy version {version} reaching every agent", report=True
            ):
                return 1
        if exit_when_converged:
            return 0
        console.print("Running. Press Ctrl-C to stop.  Try: .venv/bin/policycast admin agents")
        _watch(admin, names, console)
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
            broker.process.stop()
        console.print("stopped")


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def start_bridge(settings: Settings, manager: ManagerThread) -> BridgeThread:
    fabric = manager.fabric
    link = connect_link(settings, fabric.signing_key, client_id="policycast-up-bridge")
    bridge = Bridge(settings=settings, engine=fabric.engine, signing_key=fabric.signing_key, link=link)
    return BridgeThread(bridge).start()


def _banner(
    manager: ManagerThread, broker: LocalBroker | None, key: str, settings: Settings, agents: int
) -> Panel:
    return Panel.fit(
        f"manager   {manager.url}   (API docs: {manager.url}/docs)\n"
        f"admin key {key}\n"
        f"database  {settings.resolved_database_url}\n"
        f"broker    {broker.url + ' (Mosquitto, dynamic security)' if broker else 'none: pull only'}\n"
        f"agents    {agents}: push in Headquarters, pull elsewhere (heartbeat {DEMO_HEARTBEAT_S}-"
        f"{DEMO_HEARTBEAT_S * 2}s)",
        title="local stack",
    )


def _converge(
    admin: httpx.Client, names: dict[int, str], console: Console, what: str, *, report: bool = False
) -> bool:
    """Show the fleet until every agent holds its serial; with `report`, say how long each mode took."""
    started = time.monotonic()
    landed: dict[str, float] = {}
    deadline = started + CONVERGE_TIMEOUT_S
    with Live(console=console, refresh_per_second=4, transient=not console.is_terminal) as live:
        while True:
            agents = _ok(admin.get("/agents", params={"limit": 1000}))
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
    body = _ok(admin.get(f"/policies/{policy_id}"))["body"]
    body["allow"] = [*body.get("allow", []), f"tcp/{8000 + len(body.get('allow', []))}"]
    return int(_ok(admin.put(f"/policies/{policy_id}", json={"body": body}))["version"])


def _watch(admin: httpx.Client, names: dict[int, str], console: Console) -> None:
    with Live(console=console, refresh_per_second=2) as live:
        while True:
            agents = _ok(admin.get("/agents", params={"limit": 1000}))
            done = sum(1 for a in agents if a["up_to_date"])
            live.update(Group(fleet_table(agents, names, f"fleet: {done}/{len(agents)} up to date")))
            time.sleep(1)


def _ok(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise httpx.HTTPStatusError(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text}",
            request=response.request,
            response=response,
        )
    return response.json() if response.content else None
