"""`World`: a small company on the in-process manager, and a check that a refused request changed nothing.

`World.refused(method, path, expect, ...)` sends a request that must be refused with `expect`, checks
that the answer says why (`detail`), and that nothing changed: every row of every table (groups,
locations, policies, assignments, documents and their serials, the change counters, the audit trail, the
outbox, agents, tokens, keys and logs), the heartbeat cache and the pending sightings. Used by the
bad-input tests (tests/api/test_bad_input.py, tests/api/test_hostile_input.py).

`expand(world, value)` fills the world's ids into a request (`<root>`, `<office>`, `<agent>` ... in
text, `Id("root")` as an integer), `send_refused` sends one that must get 422 (admin or agent API by its
path), and `nested(depth)` makes JSON of a given depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import text

from tests.conftest import TABLES as ALL_TABLES
from tests.support.clients import Admin, AgentClient

TABLES = [name.strip() for name in ALL_TABLES.split(",")]


@dataclass
class World:
    """A small company: My Company (Office location, a firewall policy) with three groups below it.

    My Company
    ├── Sales          inherits; one enrolled agent
    └── Engineering    own policies and settings
        └── Build      inherits from Engineering
    """

    client: TestClient
    admin: Admin
    root: int
    sales: int
    engineering: int
    build: int
    default: int
    office: int
    engineering_office: int
    firewall: dict[str, Any]
    antivirus: dict[str, Any]
    agent: AgentClient

    def snapshot(self) -> dict[str, Any]:
        """Every row of every table, the heartbeat cache's documents, and the pending sightings."""
        fabric = self.client.app.state.fabric
        state: dict[str, Any] = {}
        with fabric.engine.connect() as connection:
            for table in TABLES:
                state[table] = connection.execute(text(f"SELECT * FROM {table} ORDER BY 1")).all()
        state["cached documents"] = {key: doc.serial for key, doc in fabric.view.documents.items()}
        state["pending sightings"] = len(fabric.ledger)
        return state

    def refused(self, method: str, path: str, expect: int, *, agent: bool = False, **kwargs: Any) -> Any:
        """Send a request that must be refused with `expect`; check nothing changed; return the detail."""
        before = self.snapshot()
        headers = {**(self.agent.headers if agent else self.admin.headers), **kwargs.pop("headers", {})}
        url = path if agent else f"/api/v1{path}"
        response = self.client.request(method, url, headers=headers, **kwargs)
        assert response.status_code == expect, f"{method} {path}: {response.status_code} {response.text}"
        detail = response.json()["detail"]
        assert detail, "an error says why"
        assert self.snapshot() == before, f"{method} {path} was refused but changed the state"
        return detail


def build_world(client: TestClient) -> World:
    admin = Admin(client)
    root = admin.root()["id"]
    office = admin.post(
        f"/groups/{root}/locations",
        {"name": "Office", "conditions": [{"type": "ip_range", "cidr": "10.0.0.0/8"}]},
    )
    firewall = admin.policy("Base firewall", "firewall", {"rules": ["allow tcp/443"]})
    antivirus = admin.policy("Antivirus", "antivirus", {"scan": "daily"})
    admin.put(f"/groups/{root}/policies/firewall", {"policy_id": firewall["id"]})
    sales = admin.group("Sales", root)
    engineering = admin.group("Engineering", root, inherit=False)
    build = admin.group("Build", engineering["id"])
    engineering_office = next(
        loc for loc in admin.get(f"/groups/{engineering['id']}/locations") if loc["name"] == "Office"
    )
    agent = admin.enroll(sales["id"], hostname="pc")
    return World(
        client=client,
        admin=admin,
        root=root,
        sales=sales["id"],
        engineering=engineering["id"],
        build=build["id"],
        default=admin.default_location(root)["id"],
        office=office["id"],
        engineering_office=engineering_office["id"],
        firewall=firewall,
        antivirus=antivirus,
        agent=agent,
    )


def nested(depth: int) -> dict[str, Any]:
    """An object `depth` levels deep: {"a": {"a": ... {}}}."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


class Id:
    """An id of the world, as an integer in a body: `Id("root")`."""

    def __init__(self, name: str) -> None:
        self.name = name


def expand(world: World, value: Any) -> Any:
    """Fill in the world's ids: `<root>`, `<office>`, `<agent>`, `<firewall>` in text, `Id(...)` as ints."""
    names: dict[str, Any] = {
        "root": world.root,
        "sales": world.sales,
        "engineering": world.engineering,
        "office": world.office,
        "default": world.default,
        "agent": world.agent.id,
        "firewall": world.firewall["id"],
    }
    if isinstance(value, Id):
        return names[value.name]
    if isinstance(value, str):
        for name, id_ in names.items():
            value = value.replace(f"<{name}>", str(id_))
        return value
    if isinstance(value, dict):
        return {k: expand(world, v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(world, v) for v in value]
    return value


def send_refused(world: World, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
    """`World.refused` with 422, the world's ids filled in; agent paths with the agent's secret."""
    agent = path.startswith("/agent/v1")
    if body is not None:
        kwargs["json"] = expand(world, body)
    path = expand(world, path) if agent else expand(world, path).removeprefix("/api/v1")
    return world.refused(method, path, 422, agent=agent, **kwargs)
