"""How long a broker takes to authorise N new agents, per engine and way of provisioning.

"Authorised" means a sample of the agents (`SAMPLE`) connect with their credentials under their own
client id and subscribe to their group's config topic, and one is refused another group's.

Mosquitto 2.0.11 (dynamic security), each on a broker of its own, its files as `policycast
broker-config` writes them, MQTT over TLS (`--plain`: plain MQTT):

- `control_api`, the baseline: one agent at a time through the control API, as the bridge's reconcile
  provisions (`MosquittoEngine.provision`). Mosquitto rewrites its whole JSON file after every command,
  so this is O(N^2): it is measured at `--baseline-agents` (default 1,000), its cumulative time at ten
  points fitted to a + b*N + c*N^2, and the fit extrapolated to `--agents`, labelled as such.
- `control_api_batched`: the same accounts, 50 agents' commands per control message
  (`accounts.provision_agents`), at `--baseline-agents`: fewer round trips, the same file rewrites.
- `bulk_file`: every account written into the stopped broker's file in one write
  (`MosquittoEngine.write_agents`, as `broker-config --with-agents`), then the broker started, at
  `--agents` (default 10,000).

NATS 2.15 (operator mode, issue [3/6]), on a 3-node cluster of its own configured by
`NatsEngine.write_cluster` (MQTT over TLS, always):

- `jwt_mint`: `--agents` agents' enrolment credentials minted (`NatsEngine.enrolment_credentials`: a
  bearer user JWT each, MQTT only, the agent's allow-lists, as enrolment hands it out); nothing is
  written to the broker, which knows only the account. Timed: the minting. The sample then connects
  with its JWT as the password, spread over the nodes, over MQTT 3.1.1 (refused: SUBACK 0x80).

`ENGINES` lists a function per engine; each returns its measurements (`Measurement`) on a `Plan`.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import SecretStr
from rich.table import Table

from bench.console import console, say
from bench.results import machine
from bench.servers import BenchTls
from broker_bridge.broker import BrokerLink
from broker_bridge.engine import ClusterNode, ClusterTls, TlsListener
from broker_bridge.mosquitto import accounts
from broker_bridge.mosquitto.engine import MosquittoEngine
from broker_bridge.nats.engine import NatsEngine
from fabric_core.broker_credentials import agent_password
from fabric_core.settings import MqttAddress, Settings
from fabric_core.signing import SigningKey
from fabric_core.tls import CA_FILE
from fabric_core.topics import DEFAULT_PREFIX, config_topic
from fabric_core.wire import MqttProtocol
from local_stack.broker_cluster import BrokerCluster
from local_stack.broker_process import BrokerProcess
from local_stack.manager import pick_port

NAME = "broker_authorisation"
DEFAULT_AGENTS = 10_000
DEFAULT_BASELINE_AGENTS = 1_000
GROUPS = 10
SAMPLE = 50
BATCH = 50
"""Agents per control message in `control_api_batched`."""
CHECKPOINTS = 10
NOT_AUTHORISED = 0x87  # MQTT 5: SUBACK for a topic the account may not read
SUBACK_FAILURE = 0x80  # MQTT 3.1.1 (NATS): its only SUBACK failure code
NATS_NODES = 3
NATS_TARGET_S = 10.0
"""Issue [3/6]: 10,000 new agents authorised on NATS within 10 s (1,000 agents/s)."""


@dataclass(frozen=True)
class Plan:
    """What one run measures: fleet sizes, transport, where brokers keep their files."""

    agents: int
    baseline_agents: int
    tls: bool
    work: Path
    sample: int = SAMPLE


@dataclass
class Measurement:
    engine: str
    method: str
    agents: int
    seconds: float
    """From nothing to every account made and the broker serving them (for bulk_file: the write plus
    the broker's start)."""
    parts: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(accounts made, seconds so far), where the cost grows with the fleet."""
    verified: dict[str, Any] = field(default_factory=dict)
    extrapolated: dict[str, Any] | None = None
    note: str = ""

    @property
    def per_agent_ms(self) -> float:
        return round(self.seconds / self.agents * 1000, 3) if self.agents else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_agent_ms": self.per_agent_ms}


def agent_id(i: int) -> str:
    return f"bench-{i:06d}"


def group_of(i: int) -> int:
    return 1 + i % GROUPS


# --- Mosquitto ------------------------------------------------------------------------------------------


class MosquittoUnderTest:
    """A Mosquitto configured by `MosquittoEngine.write_config` in a directory of its own, stopped."""

    def __init__(self, directory: Path, tls: BenchTls | None) -> None:
        self.key = SigningKey.generate()
        self.bridge_password = secrets.token_urlsafe(18)
        settings = Settings(
            data_dir=directory,
            mqtt_prefix=DEFAULT_PREFIX,
            mqtt_username="policycast-bridge",
            mqtt_password=SecretStr(self.bridge_password),
        )
        self.engine = MosquittoEngine(settings, self.key)
        self.directory = directory
        self.port = pick_port(0)
        self.context: ssl.SSLContext | None = tls.client if tls is not None else None
        listener = None
        if tls is not None:
            files = tls.server_files("broker")
            listener = TlsListener(self.port, files.certfile, files.keyfile)
        plain = None if listener is not None else self.port
        launch = self.engine.write_config(directory, bind="127.0.0.1", tls=listener, plain_port=plain)
        self.process = BrokerProcess(launch)
        self.address = MqttAddress("127.0.0.1", self.port, tls=tls is not None)

    def start(self) -> float:
        began = time.monotonic()
        self.process.start(timeout=300)
        return time.monotonic() - began

    def link(self) -> BrokerLink:
        link = BrokerLink(
            self.address,
            username="policycast-bridge",
            password=self.bridge_password,
            client_id=f"bench-bridge-{secrets.token_hex(3)}",
            ssl_context=self.context,
        )
        link.connect(10)
        return link

    protocol: MqttProtocol = "5"
    refused_code = NOT_AUTHORISED

    def address_of(self, i: int) -> MqttAddress:
        return self.address

    def password(self, i: int) -> str:
        return agent_password(self.key, agent_id(i))


@contextlib.contextmanager
def mosquitto(plan: Plan, name: str) -> Iterator[MosquittoUnderTest]:
    directory = plan.work / name
    tls = BenchTls(plan.work) if plan.tls else None
    broker = MosquittoUnderTest(directory, tls)
    try:
        yield broker
    finally:
        broker.process.stop()


def _through_control_api(
    plan: Plan,
    method: str,
    step: int,
    make: Callable[[MosquittoUnderTest, BrokerLink, range], None],
    note: str,
) -> Measurement:
    """Accounts made on a running broker, `step` agents at a time by `make`, timed cumulatively."""
    n = plan.baseline_agents
    with mosquitto(plan, method) as broker:
        broker.start()
        link = broker.link()
        try:
            say(f"mosquitto, {method}: {n} agents")
            curve: list[tuple[int, float]] = []
            began = time.monotonic()
            for start in range(0, n, step):
                make(broker, link, range(start, min(start + step, n)))
                curve.append((min(start + step, n), round(time.monotonic() - began, 3)))
                say(f"  {curve[-1][0]} accounts in {curve[-1][1]:.1f}s")
            seconds = time.monotonic() - began
        finally:
            link.close()
        verified = verify(broker, n, plan.sample)
    extrapolated = extrapolate(curve, plan.agents)
    return Measurement(
        "mosquitto",
        method,
        n,
        round(seconds, 3),
        curve=curve,
        verified=verified,
        extrapolated=extrapolated,
        note=note,
    )


def _one_by_one(broker: MosquittoUnderTest, link: BrokerLink, agents: range) -> None:
    for i in agents:
        broker.engine.provision(link, agent_id=agent_id(i), group_id=group_of(i))


def _batched(broker: MosquittoUnderTest, link: BrokerLink, agents: range) -> None:
    chunk: list[tuple[str, str | int, str]] = [(agent_id(i), group_of(i), broker.password(i)) for i in agents]
    accounts.provision_agents(link, prefix=DEFAULT_PREFIX, agents=chunk, per_message=BATCH)


def control_api_one_by_one(plan: Plan) -> Measurement:
    step = max(plan.baseline_agents // CHECKPOINTS, 1)
    note = "the baseline: the bridge's path, one control message (3 commands) per agent"
    return _through_control_api(plan, "control_api", step, _one_by_one, note)


def control_api_batched(plan: Plan) -> Measurement:
    step = max(plan.baseline_agents // CHECKPOINTS, BATCH)
    note = f"{BATCH} agents' commands per control message (each group's role once)"
    return _through_control_api(plan, "control_api_batched", step, _batched, note)


def bulk_file(plan: Plan) -> Measurement:
    n = plan.agents
    with mosquitto(plan, "bulk-file") as broker:
        say(f"mosquitto, bulk write of the dynamic-security file before the start: {n} agents")
        began = time.monotonic()
        written = broker.engine.write_agents(broker.directory, ((agent_id(i), group_of(i)) for i in range(n)))
        write_s = time.monotonic() - began
        start_s = broker.start()
        seconds = time.monotonic() - began
        assert written == n
        size = (broker.directory / "dynamic-security.json").stat().st_size
        say(f"  written in {write_s:.2f}s ({size / 1e6:.1f} MB), broker up {start_s:.2f}s later")
        verified = verify(broker, n, plan.sample)
    return Measurement(
        "mosquitto",
        "bulk_file",
        n,
        round(seconds, 3),
        parts={"write_s": round(write_s, 3), "broker_start_s": round(start_s, 3), "file_bytes": size},
        verified=verified,
        note="broker-config --with-agents: one atomic write (passwords hashed here), then the start",
    )


def mosquitto_measurements(plan: Plan) -> list[Measurement]:
    return [control_api_one_by_one(plan), control_api_batched(plan), bulk_file(plan)]


# --- NATS ------------------------------------------------------------------------------------------------


class NatsUnderTest:
    """A NATS cluster of `nodes` configured by `NatsEngine.write_cluster` in a directory of its own
    (MQTT over TLS, routes with mutual TLS, certificates from the run's CA), stopped; the sample's
    credentials are the JWTs minted for them."""

    protocol: MqttProtocol = "3.1.1"
    refused_code = SUBACK_FAILURE

    def __init__(self, directory: Path, tls: BenchTls, nodes: int = NATS_NODES) -> None:
        self.members = [
            ClusterNode(pick_port(0), pick_port(0), pick_port(0), pick_port(0)) for _ in range(nodes)
        ]
        self.settings = Settings(
            data_dir=directory,
            broker_engine="nats",
            mqtt_prefix=DEFAULT_PREFIX,
            mqtt_url=",".join(node.mqtt_url for node in self.members),
            nats_urls=",".join(f"tls://127.0.0.1:{node.client_port}" for node in self.members),
        )
        self.engine = NatsEngine(self.settings, None)
        self.context: ssl.SSLContext | None = tls.client
        route = tls.ca.server_files(
            tls.directory / "tls", "route", ["127.0.0.1", "localhost"], client_auth=True
        )
        cluster_tls = ClusterTls(tls.server_files("broker"), route, tls.directory / "tls" / CA_FILE)
        launches = self.engine.write_cluster(
            directory / "nats", bind="127.0.0.1", nodes=self.members, tls=cluster_tls
        )
        self.cluster = BrokerCluster(launches)
        self.tokens: dict[int, str] = {}

    def start(self) -> float:
        began = time.monotonic()
        self.cluster.start(timeout=120)
        return time.monotonic() - began

    def address_of(self, i: int) -> MqttAddress:  # the sample spreads over the nodes
        node = self.members[i % len(self.members)]
        return MqttAddress("127.0.0.1", node.mqtt_port, tls=True)

    def password(self, i: int) -> str:
        return self.tokens[i]


def jwt_mint(plan: Plan) -> Measurement:
    n = plan.agents
    tls = BenchTls(plan.work)  # NATS listens on TLS only, whatever --plain says
    broker = NatsUnderTest(plan.work / "nats", tls)
    try:
        start_s = broker.start()
        say(f"nats, {len(broker.members)} nodes up in {start_s:.2f}s; minting {n} agents' user JWTs")
        sample = set(_sample(n, plan.sample))
        began = time.monotonic()
        size = 0
        for i in range(n):
            credentials = broker.engine.enrolment_credentials(agent_id(i), group_of(i))
            size += len(credentials.password)
            if i in sample:
                broker.tokens[i] = credentials.password
        seconds = time.monotonic() - began
        say(f"  {n} JWTs in {seconds:.2f}s ({n / seconds:,.0f}/s), {size / n:.0f} bytes each")
        verified = verify(broker, n, plan.sample)
    finally:
        broker.cluster.stop()
    return Measurement(
        "nats",
        "jwt_mint",
        n,
        round(seconds, 3),
        parts={"mint_s": round(seconds, 3), "agents_per_s": round(n / seconds) if seconds else 0.0}
        | {"jwt_bytes_mean": round(size / n) if n else 0.0, "cluster_nodes": len(broker.members)}
        | {"cluster_start_s_not_counted": round(start_s, 3), "broker_writes": 0},
        verified=verified,
        note="NatsEngine.enrolment_credentials per agent (a bearer user JWT); nothing written to the "
        "broker, started once for the whole fleet (its start is not per agent and not counted)",
    )


def nats_measurements(plan: Plan) -> list[Measurement]:
    return [jwt_mint(plan)]


UnderTest = MosquittoUnderTest | NatsUnderTest
"""A broker the verifier can try agents on: `address_of(i)`, `context`, `password(i)`, `protocol`."""

ENGINES: list[Callable[[Plan], list[Measurement]]] = [mosquitto_measurements, nats_measurements]
"""One function per broker engine; each measures its ways of authorising `plan`'s agents."""


# --- verification ----------------------------------------------------------------------------------------


class _Probe:
    """One paho MQTT client as an agent (MQTT 5, or 3.1.1 on NATS): CONNECT, then SUBSCRIBEs, each
    answer awaited."""

    def __init__(self, broker: UnderTest, i: int, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.v5 = broker.protocol == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=agent_id(i),
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else True,
            reconnect_on_failure=False,
        )
        self.client.username_pw_set(agent_id(i), broker.password(i))
        if broker.context is not None:
            self.client.tls_set_context(broker.context)
        self.answer: Any = None
        self.event = threading.Event()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self._got(rc)
        self.client.on_subscribe = lambda _c, _u, _m, rcs, _p: self._got(rcs[0])
        self.address = broker.address_of(i)

    def _got(self, value: Any) -> None:
        self.answer = value
        self.event.set()

    def _wait(self, what: str) -> Any:
        if not self.event.wait(self.timeout):
            raise TimeoutError(f"no answer to {what} within {self.timeout}s")
        self.event.clear()
        return self.answer

    def connect(self) -> Any:
        self.client.connect(self.address.host, self.address.port, keepalive=30)
        self.client.loop_start()
        return self._wait("CONNECT")

    def subscribe(self, topic: str) -> Any:
        if self.v5:
            self.client.subscribe(topic, options=SubscribeOptions(qos=1))
        else:
            self.client.subscribe(topic, qos=0)  # NATS: QoS 0 (QoS 1 would be a JetStream consumer)
        return self._wait(f"SUBSCRIBE {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def verify(broker: UnderTest, agents: int, sample: int) -> dict[str, Any]:
    """A sample of the agents connect and subscribe to their group's config topic; each is refused the
    next group's. Raises if any is not authorised as it should be."""
    indices = _sample(agents, sample)
    began = time.monotonic()
    refused = 0
    for i in indices:
        probe = _Probe(broker, i)
        try:
            connack = probe.connect()
            if connack.is_failure:
                raise AssertionError(f"agent {agent_id(i)} could not connect: {connack}")
            own = probe.subscribe(config_topic(DEFAULT_PREFIX, group_of(i), 1))
            if own.is_failure:
                raise AssertionError(f"agent {agent_id(i)} was refused its own config topic: {own}")
            other = probe.subscribe(config_topic(DEFAULT_PREFIX, group_of(i + 1), 1))
            if not (other.is_failure and other.value == broker.refused_code):
                raise AssertionError(f"agent {agent_id(i)} may read another group's config: {other}")
            refused += 1
        finally:
            probe.close()
    nodes = sorted({broker.address_of(i).port for i in indices})
    return {
        "sampled": len(indices),
        "nodes": len(nodes),
        "connected_and_subscribed": len(indices),
        "refused_other_group": refused,
        "verify_s": round(time.monotonic() - began, 3),
    }


def _sample(agents: int, sample: int) -> list[int]:
    if agents <= sample:
        return list(range(agents))
    # evenly spread, first and last included; distinct, as the step is at least 1
    return [k * (agents - 1) // (sample - 1) for k in range(sample)]


# --- the fit ---------------------------------------------------------------------------------------------


def extrapolate(curve: list[tuple[int, float]], agents: int) -> dict[str, Any] | None:
    """The cumulative time fitted to a + b*N + c*N^2 (least squares) and evaluated at `agents`."""
    if len(curve) < 3 or agents <= curve[-1][0]:
        return None
    a, b, c = _quadratic_fit([float(point[0]) for point in curve], [point[1] for point in curve])
    predicted = float(a + b * agents + c * agents * agents)
    return {
        "label": f"EXTRAPOLATED from {curve[-1][0]} measured agents (fit a + b*N + c*N^2), not measured",
        "agents": agents,
        "seconds": round(predicted, 1),
        "per_agent_ms": round(predicted / agents * 1000, 2),
        "fit": {
            "a_s": round(float(a), 4),
            "b_ms_per_agent": round(float(b) * 1000, 4),
            "c_us_per_agent2": round(float(c) * 1e6, 5),
        },
    }


def _quadratic_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """(a, b, c) minimising the squared error of a + b*x + c*x^2: the normal equations, solved by
    Gaussian elimination (three unknowns)."""
    sums = [sum(x**k for x in xs) for k in range(5)]
    rows = [
        [sums[r], sums[r + 1], sums[r + 2], sum(y * x**r for x, y in zip(xs, ys, strict=True))]
        for r in range(3)
    ]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(rows[r][col]))
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(3):
            if r != col:
                factor = rows[r][col] / rows[col][col]
                rows[r] = [v - factor * p for v, p in zip(rows[r], rows[col], strict=True)]
    a, b, c = (rows[i][3] / rows[i][i] for i in range(3))
    return a, b, c


# --- the run ---------------------------------------------------------------------------------------------


def plan_of(args: argparse.Namespace, work: Path) -> Plan:
    agents = getattr(args, "agents", None) or DEFAULT_AGENTS
    baseline = getattr(args, "baseline_agents", None) or min(DEFAULT_BASELINE_AGENTS, agents)
    return Plan(agents=agents, baseline_agents=baseline, tls=not getattr(args, "plain", False), work=work)


def summary(measurements: list[Measurement], plan: Plan) -> dict[str, Any]:
    by = {m.method: m for m in measurements if m.engine == "mosquitto"}
    out: dict[str, Any] = {}
    base, batched, bulk = by.get("control_api"), by.get("control_api_batched"), by.get("bulk_file")
    if base is not None:
        out["control_api_per_agent_ms"] = base.per_agent_ms
        out["control_api_measured_agents"] = base.agents
        if base.extrapolated:
            out["control_api_extrapolated_s"] = base.extrapolated["seconds"]
            out["control_api_extrapolated_label"] = base.extrapolated["label"]
    if base is not None and batched is not None:
        out["batched_vs_one_by_one"] = round(batched.seconds / base.seconds, 3) if base.seconds else None
    if bulk is not None:
        out["bulk_file_s"] = bulk.seconds
        out["bulk_file_per_agent_ms"] = bulk.per_agent_ms
        reference = base.extrapolated["seconds"] if base is not None and base.extrapolated else None
        if reference is None and base is not None and base.agents == bulk.agents:
            reference = base.seconds
        if reference:
            out["speedup_bulk_vs_control_api"] = round(reference / bulk.seconds, 1)
    nats = next((m for m in measurements if m.engine == "nats" and m.method == "jwt_mint"), None)
    if nats is not None:
        out["nats_jwt_mint_s"] = nats.seconds
        out["nats_agents_per_s"] = nats.parts.get("agents_per_s")
        out["nats_target_s"] = NATS_TARGET_S
        out["nats_met"] = nats.seconds <= NATS_TARGET_S and nats.verified.get("refused_other_group") == (
            nats.verified.get("sampled")
        )
        if base is not None:  # the baseline: the control API, at the same fleet size
            reference = base.extrapolated["seconds"] if base.extrapolated else None
            if reference is None and base.agents == nats.agents:
                reference = base.seconds
            if reference:
                out["nats_vs_control_api"] = round(nats.seconds / reference, 5)
                out["nats_vs_control_api_label"] = (
                    "against the control API's EXTRAPOLATED figure" if base.extrapolated else "measured"
                )
        if bulk is not None and bulk.seconds:
            out["nats_vs_bulk_file"] = round(nats.seconds / bulk.seconds, 3)
    return out


def show(measurements: list[Measurement], plan: Plan) -> None:
    table = Table(title=f"authorising new agents ({'MQTT over TLS' if plan.tls else 'plain MQTT'})")
    for column in ("engine", "method", "agents", "seconds", "ms/ag", "in", "refused"):
        left = column in ("engine", "method")
        table.add_column(column, justify="left" if left else "right", no_wrap=left)
    for m in measurements:
        v = m.verified
        sample = f"{v.get('connected_and_subscribed', 0)}/{v.get('sampled', 0)}"
        refused = f"{v.get('refused_other_group', 0)}/{v.get('sampled', 0)}"
        table.add_row(
            m.engine, m.method, f"{m.agents:,}", f"{m.seconds:,.2f}", f"{m.per_agent_ms:.2f}", sample, refused
        )
        if m.extrapolated:
            e = m.extrapolated
            table.add_row(
                "",
                "[yellow]  extrapolated[/]",  # the row above's method
                f"{e['agents']:,}",
                f"[yellow]~{e['seconds']:,.0f}[/]",
                f"[yellow]{e['per_agent_ms']:.2f}[/]",
                "[yellow]fit[/]",
                "[yellow]only[/]",
            )
    console.print(table)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pc-bench-auth-") as work:
        plan = plan_of(args, Path(work))
        say(f"authorising {plan.agents:,} agents (baseline at {plan.baseline_agents:,})")
        measurements = [m for engine in ENGINES for m in engine(plan)]
    show(measurements, plan)
    return {
        "name": NAME,
        "machine": machine(),
        "transport": {"broker": "mqtts" if plan.tls else "mqtt"},
        "agents": plan.agents,
        "baseline_agents": plan.baseline_agents,
        "sample": plan.sample,
        "measurements": [m.as_dict() for m in measurements],
        "summary": summary(measurements, plan),
        "notes": (
            "Time from nothing to N agent accounts a broker serves; authorised = a sample connects under "
            "its own client id and subscribes to its group's config topic, and is refused another group's. "
            "control_api is measured at baseline_agents only; its figure at `agents` is a quadratic fit, "
            "labelled EXTRAPOLATED."
        ),
    }
