"""The demo fleet of `policycast up`: groups and policies seeded through the admin API, and agents
enrolled and run with the real agent logic (`agent_stub`) against the real HTTP API."""

from __future__ import annotations

import asyncio
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from agent_stub import trust
from agent_stub.core import AgentCore
from agent_stub.manager_client import ManagerClient
from agent_stub.runtime import AgentRuntime
from agent_stub.state import FileStateStore, Identity
from fabric_core.settings import AgentSettings

DEMO_HEARTBEAT_S = 5
DEMO_GROUPS = (
    # name, inherits, communication of its own (push needs a broker; without one it stays pull)
    ("Headquarters", False, {"mode": "push", "heartbeat_s": 60}),
    ("Branch Offices", False, {"heartbeat_s": DEMO_HEARTBEAT_S * 2}),
    ("Laptops", True, None),
)


@dataclass
class Demo:
    """The demo fleet's shape, as seeded through the admin API."""

    group_ids: dict[str, int]
    firewall_policy_id: int


def seed(admin: httpx.Client, *, push: bool) -> Demo:
    """Create the demo groups and policies once; later runs find and reuse them."""
    groups = {g["name"]: g for g in ok(admin.get("/groups"))}
    root = next(g for g in groups.values() if g["parent_id"] is None)
    policies = {p["name"]: p for p in ok(admin.get("/policies"))}
    if "Corporate firewall" not in policies:
        ok(
            admin.put(
                f"/groups/{root['id']}/communication", json={"mode": "pull", "heartbeat_s": DEMO_HEARTBEAT_S}
            )
        )
        firewall = ok(
            admin.post(
                "/policies",
                json={
                    "name": "Corporate firewall",
                    "type": "firewall",
                    "body": {"default": "deny", "allow": []},
                },
            )
        )
        antivirus = ok(
            admin.post(
                "/policies",
                json={"name": "Antivirus standard", "type": "antivirus", "body": {"scan": "daily"}},
            )
        )
        for policy in (firewall, antivirus):
            ok(admin.put(f"/groups/{root['id']}/policies/{policy['type']}", json={"policy_id": policy["id"]}))
        policies = {p["name"]: p for p in ok(admin.get("/policies"))}
    for name, inherits, communication in DEMO_GROUPS:
        if name not in groups:
            groups[name] = ok(
                admin.post("/groups", json={"name": name, "parent_id": root["id"], "inherit": inherits})
            )
        if communication and not inherits:
            wanted = {**communication, "mode": communication.get("mode", "pull") if push else "pull"}
            ok(admin.put(f"/groups/{groups[name]['id']}/communication", json=wanted))
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
            answer = ok(admin.post(f"/groups/{group_id}/enrollment-tokens", json={"max_uses": 1}))
            hostname = f"demo-{index + 1:02d}"
            cas = asyncio.run(_pinned(manager_url, answer["ca_hash"]))
            response = asyncio.run(
                ManagerClient.enroll(
                    server=manager_url,
                    token=answer["token"],
                    hostname=hostname,
                    facts={"demo": True},
                    ssl_context=trust.context_for(cas),
                )
            )
            identity = Identity.from_enrollment(
                server=manager_url, response=response, hostname=hostname, trusted_cas=cas
            )
            store.save_identity(identity)
        dirs.append(state_dir)
    return dirs


async def _pinned(manager_url: str, ca_hash: str | None) -> list[str]:
    """The CA a demo agent pins, as `policycast-agent enroll` does (none over plain HTTP)."""
    if ca_hash is None:
        return []
    return await trust.pin(manager_url, ca_hash, timeout_s=10)


@dataclass
class AgentFleet:
    """Demo agents: the real agent runtime (pull, and push where the document says so), one asyncio task
    each, all on one background thread."""

    state_dirs: list[Path]
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    thread: threading.Thread | None = None
    stop_event: asyncio.Event | None = None

    @property
    def agent_ids(self) -> set[str]:
        """The demo agents' ids (the fleet the stack shows: not agents of earlier runs)."""
        ids = set()
        for state_dir in self.state_dirs:
            identity = FileStateStore(state_dir).load_identity()
            if identity is not None:
                ids.add(identity.agent_id)
        return ids

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
                    ssl_context=trust.context_for(core.identity.trusted_cas),
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


def forget_stale_agents(
    admin: httpx.Client, agents_dir: Path, manager_url: str, broker_urls: list[str] | None
) -> None:
    """Demo agents enrolled against another manager or broker address (another port, another broker
    engine, or from before TLS) re-enrol (they are demo agents only); the old ones are revoked, so
    that the fleet shown is the one running."""
    if not agents_dir.is_dir():
        return
    for state_dir in agents_dir.iterdir():
        identity = FileStateStore(state_dir).load_identity() if state_dir.is_dir() else None
        known = identity.mqtt.broker_urls if identity is not None and identity.mqtt is not None else None
        if identity is not None and (known != broker_urls or identity.server != manager_url):
            shutil.rmtree(state_dir)
            answer = admin.delete(f"/agents/{identity.agent_id}")
            if answer.status_code not in (204, 404, 409):  # gone or revoked already: fine
                ok(answer)


def ok(response: httpx.Response) -> Any:
    """The JSON of a successful answer; an `HTTPStatusError` naming the request otherwise."""
    if response.status_code >= 400:
        raise httpx.HTTPStatusError(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text}",
            request=response.request,
            response=response,
        )
    return response.json() if response.content else None
