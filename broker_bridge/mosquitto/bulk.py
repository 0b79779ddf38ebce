"""Agent accounts written in bulk: straight into the dynamic-security JSON, before the broker starts.

Mosquitto 2.0.11 rewrites its whole JSON file after every dynamic-security command, so provisioning a
fleet one account at a time through the control API is O(N^2) (docs/performance.md, "Mosquitto:
provisioning cost"). Where many accounts are made at once (`policycast broker-config --with-agents`,
the benchmarks' fleets, the tests' `Broker.provision_many`) they are written here instead: one read,
one atomic write (`config.write_dynsec`), O(N). The accounts are exactly the control API's: both
paths build them from `dynsec.agent_account`, and `bulk` only turns that definition into the JSON
entries Mosquitto itself saves.

- `write_agent_accounts(layout, prefix=..., agents=...)`: add or replace agents' clients and roles in
  a stopped broker's file (`BrokerRunning` if its pid file names a live Mosquitto).
- `provision_fleet(database, broker, directory)`: every active agent of the agents table, written
  with its derived password, and recorded as provisioned (`acl_group_id`, as `reconcile` records it)
  so that the bridge does not provision them again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Engine

from broker_bridge import reconcile
from broker_bridge.errors import BrokerError
from broker_bridge.mosquitto import dynsec
from broker_bridge.mosquitto.config import BrokerLayout, hash_password, write_dynsec

if TYPE_CHECKING:
    from broker_bridge.mosquitto.engine import MosquittoEngine

log = logging.getLogger(__name__)

BulkAgent = tuple[str, str | int, str]
"""(agent id, group id, password)."""


class BrokerRunning(BrokerError, ValueError):
    """The broker owning the file is running: it would overwrite what is written behind its back. (A
    `ValueError` too, so that commands report it in one line.)"""


def role_entry(role: dynsec.Role) -> dict[str, Any]:
    """A role as Mosquitto saves it."""
    return {"rolename": role.name, "acls": [dict(entry) for entry in role.acls]}


def client_entry(account: dynsec.AgentAccount, password: str) -> dict[str, Any]:
    """A client as Mosquitto saves it after `createClient` (username, bound client id, roles, hash)."""
    return {
        "username": account.username,
        "clientid": account.client_id,
        "roles": [{"rolename": name} for name in account.role_names],
        **hash_password(password),
    }


def add_agents(content: dict[str, Any], *, prefix: str, agents: Iterable[BulkAgent]) -> int:
    """Add (or replace) each agent's client and roles in a dynamic-security document; return how many.

    A replaced client keeps its other fields (a text name, `disabled`) and gets the password, roles and
    client id given, as `modifyClient` does when `provision_agent` resets an account."""
    clients: list[dict[str, Any]] = content.setdefault("clients", [])
    roles: list[dict[str, Any]] = content.setdefault("roles", [])
    client_at = {str(client.get("username")): i for i, client in enumerate(clients)}
    role_at = {str(role.get("rolename")): i for i, role in enumerate(roles)}
    count = 0
    for agent_id, group_id, password in agents:
        account = dynsec.agent_account(prefix, agent_id, group_id)
        for role in account.roles:
            _upsert(roles, role_at, role.name, role_entry(role))
        entry = client_entry(account, password)
        at = client_at.get(account.username)
        if at is None:
            client_at[account.username] = len(clients)
            clients.append(entry)
        else:
            clients[at].update(entry)
        count += 1
    return count


def _upsert(items: list[dict[str, Any]], index: dict[str, int], key: str, entry: dict[str, Any]) -> None:
    at = index.get(key)
    if at is None:
        index[key] = len(items)
        items.append(entry)
    else:
        items[at] = entry


def running_pid(layout: BrokerLayout) -> int | None:
    """The pid of the Mosquitto that `layout`'s pid file names, if that process is alive (Mosquitto
    removes its pid file on a clean exit; a stale one after a crash names no live Mosquitto)."""
    try:
        pid = int(layout.pid_path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (macOS): alive is enough
        except (ProcessLookupError, PermissionError):
            return None
        return pid
    return pid if b"mosquitto" in command else None


def write_agent_accounts(layout: BrokerLayout, *, prefix: str, agents: Iterable[BulkAgent]) -> int:
    """Add or replace the agents' accounts in the stopped broker's dynamic-security file (written by
    `write_broker_files` first), in one atomic write; return how many."""
    pid = running_pid(layout)
    if pid is not None:
        raise BrokerRunning(
            f"the broker using {layout.dynsec_path} is running (pid {pid}): stop it before writing agent "
            "accounts into its file, or let the bridge provision them through the control API"
        )
    content = orjson.loads(layout.dynsec_path.read_bytes())
    count = add_agents(content, prefix=prefix, agents=agents)
    write_dynsec(layout.dynsec_path, content)
    log.info("wrote %d agent accounts into %s", count, layout.dynsec_path)
    return count


def provision_fleet(database: Engine, broker: MosquittoEngine, directory: Path) -> int:
    """Write every active agent's account into the stopped broker's file in `directory` and record
    them as provisioned; return how many.

    The file is written before the table: a crash in between leaves accounts the bridge provisions
    again (harmless), never agents recorded with no account."""
    agents = reconcile.active_agents(database)
    count = broker.write_agents(directory, [(agent_id, group_id) for agent_id, group_id, _ in agents])
    reconcile.record_provisioned(database, agents)
    return count
