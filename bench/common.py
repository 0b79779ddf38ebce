"""What the benchmarks share: the stack in a kept data directory, the fleet simulator as a child process,
and result files.

The stack is `policycast up`'s, from its own pieces (`local_stack.stack.start_broker`, `ManagerThread`,
`start_bridge`): Mosquitto with Policycast's configuration as a child process, the manager (uvicorn, on
SQLite) and the bridge on threads of this process. The fleet runs in another process
(`policycast-agent simulate --control`), so that agents and manager do not share one interpreter lock.
Both processes read the same clock (`time.time()`), so latencies are measured across them.

Broker accounts cost Mosquitto 10-50 ms each to provision (it rewrites its whole dynamic-security file
on every change), so the data directory, the broker's files and the simulated agents' identities are
kept under `bench/.work/fleet/` (gitignored) and reused: the first run at a size enrols and provisions,
later runs start at once. `--fresh` starts from nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
from pydantic import SecretStr
from rich.console import Console
from sqlalchemy import text
from starlette.types import ASGIApp, Receive, Scope, Send

from agent_stub.measure import percentiles, raise_fd_limit, rss_bytes
from broker_bridge import dynsec
from broker_bridge.broker import BrokerLink, Publication
from broker_bridge.credentials import bridge_password
from broker_bridge.service import BridgeThread
from fabric_core.errors import PolicycastError
from fabric_core.settings import MqttAddress, Settings
from fabric_core.signing import VerifyKey, load_signing_key, open_envelope
from fabric_core.topics import all_configs_filter, parse_topic
from local_stack.stack import LocalBroker, ManagerThread, admin_key_for, pick_port, start_bridge, start_broker

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / ".work"
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_AGENTS = 2000
FULL_AGENTS = 10_000
GROUPS = 10
LOCATIONS = 2
POLICY_NAME = "bench-firewall"
HEARTBEAT_PATH = "/agent/v1/heartbeat"

console = Console(stderr=True, highlight=False)
T = TypeVar("T")
OBSERVER = "bench-observer"
"""The name (plus a suffix per run) of the wildcard config subscriber's broker account and role."""


def say(message: str) -> None:
    console.print(f"[dim]{datetime.now().strftime('%H:%M:%S')}[/] {message}")


def fleet_size(args: argparse.Namespace) -> int:
    agents: int | None = getattr(args, "agents", None)
    if agents:
        return agents
    return FULL_AGENTS if getattr(args, "full", False) else DEFAULT_AGENTS


def work_dir(args: argparse.Namespace, name: str = "fleet") -> Path:
    root = Path(getattr(args, "work_dir", None) or WORK_DIR)
    path = root / name
    if getattr(args, "fresh", False) and path.exists() and not getattr(args, "_fresh_done", False):
        shutil.rmtree(path)
        args._fresh_done = True  # once per `python -m bench` run, not once per benchmark
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time a process has used so far (Linux), 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by the simulator, Mosquitto and this process (manager and bridge) since start."""

    def __init__(self, stack: Stack, sim: SimProcess) -> None:
        self._stack = stack
        self.pids = {"simulator": sim.pid, "broker": stack.broker_pid, "manager_and_bridge": os.getpid()}
        self.start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.began = time.monotonic()

    def read(self) -> dict[str, float]:
        used = {name: round(cpu_seconds(pid) - self.start[name], 2) for name, pid in self.pids.items()}
        broker = self._stack.broker_pid
        if (
            broker != self.pids["broker"]
        ):  # restarted meanwhile: the new process's time (the old one's is gone)
            used["broker"] = round(cpu_seconds(broker), 2)
        return {**used, "wall": round(time.monotonic() - self.began, 2)}


class ManagerProbe:
    """GET /healthz every `interval` seconds on a thread of its own: how responsive the manager stays."""

    def __init__(self, url: str, interval: float = 0.5) -> None:
        self.url = f"{url}/healthz"
        self.interval = interval
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="manager-probe", daemon=True)

    def __enter__(self) -> ManagerProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                began = time.monotonic()
                try:
                    client.get(self.url).raise_for_status()
                    self.latencies.append(time.monotonic() - began)
                except httpx.HTTPError:
                    self.failures += 1
                self._stop.wait(self.interval)

    def result(self) -> dict[str, Any]:
        return {"healthz_latency_s": percentiles(self.latencies), "failures": self.failures}


def wait_until(check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --- counting heartbeats at the manager ------------------------------------------------------------------


class HeartbeatCounter:
    """ASGI middleware: heartbeat requests received by the manager, per wall-clock second."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.per_s: Counter[int] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == HEARTBEAT_PATH:
            self.per_s[int(time.time())] += 1
        await self.app(scope, receive, send)

    def window(self, since: float, until: float) -> dict[str, Any]:
        counts = {s: n for s, n in list(self.per_s.items()) if int(since) <= s <= int(until)}
        return {
            "peak_per_s": max(counts.values(), default=0),
            "total": sum(counts.values()),
            "per_s": [counts.get(s, 0) for s in range(int(since), int(until) + 1)],
        }


# --- the stack -----------------------------------------------------------------------------------------


class Stack:
    """Mosquitto, the manager and the bridge, on a data directory kept between runs."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        settings = Settings(data_dir=data_dir / "manager")
        self.admin_key = admin_key_for(settings)
        self.settings = settings.model_copy(update={"bootstrap_admin_key": SecretStr(self.admin_key)})
        self.broker: LocalBroker | None = None
        self.manager: ManagerThread | None = None
        self.bridge: BridgeThread | None = None
        self.counter: HeartbeatCounter | None = None
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
        self.broker = start_broker(self.settings, console)
        if self.broker is None:
            raise RuntimeError("the benchmarks need Mosquitto 2 with its dynamic-security plugin")
        self.settings = self.settings.model_copy(update={"mqtt_url": self.broker.url, "mqtt_enabled": True})
        self.manager = ManagerThread(self.settings, pick_port(0))
        self.manager.app.add_middleware(HeartbeatCounter)
        self.manager.start()
        self.counter = _find_counter(self.manager)
        self.bridge = start_bridge(self.settings, self.manager)
        say(f"stack up: manager {self.manager.url}, broker {self.broker.url}, data {self.data_dir}")

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
        if self.bridge is not None:
            self.bridge.stop()
        if self.manager is not None:
            self.manager.stop()
        if self.broker is not None:
            self.broker.process.stop()

    # --- admin API ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.manager is not None
        return self.manager.url

    @property
    def admin(self) -> httpx.Client:
        if self._admin is None:
            self._admin = httpx.Client(
                base_url=f"{self.url}/api/v1",
                headers={"Authorization": f"Bearer {self.admin_key}"},
                timeout=60,
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
        return {
            key: int(json.loads(body)["doc"]["serial"]) for key, body in self.current_documents(keys).items()
        }

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

    def unprovisioned(self) -> int:
        assert self.manager is not None
        with self.manager.fabric.engine.connect() as connection:
            query = text("SELECT count(*) FROM agents WHERE revoked_at IS NULL AND acl_group_id IS NULL")
            return int(connection.execute(query).scalar_one())

    def accounts(self) -> int:
        """Agents with a broker account."""
        assert self.manager is not None
        with self.manager.fabric.engine.connect() as connection:
            query = text("SELECT count(*) FROM agents WHERE acl_group_id IS NOT NULL")
            return int(connection.execute(query).scalar_one())

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
        return self.broker.process.pid if self.broker is not None else None

    def publisher(self, client_id: str = "bench-baseline") -> BrokerLink:
        """A connection with the bridge's rights, to publish straight to the broker."""
        assert self.broker is not None and self.manager is not None
        link = BrokerLink(
            self.settings.mqtt_address,
            username=self.settings.mqtt_username,
            password=bridge_password(self.settings, self.manager.fabric.signing_key),
            client_id=client_id,
        )
        link.connect(10)
        return link


class Observer:
    """A wildcard subscriber on every config topic, in a process of its own, with its own account."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.process: Any = None
        self.conn: Connection | None = None

    def __enter__(self) -> Observer:
        stack = self.stack
        assert stack.manager is not None
        prefix = stack.settings.mqtt_prefix
        password = uuid.uuid4().hex
        # Its own name each time: the benchmarks' broker keeps its accounts between runs.
        self.name = name = f"{OBSERVER}-{uuid.uuid4().hex[:8]}"
        every = all_configs_filter(prefix)
        link = stack.publisher("bench-observer-admin")
        try:
            dynsec.check(
                link.control(
                    [
                        dynsec.create_role(
                            name,
                            [
                                dynsec.acl("subscribePattern", every),
                                dynsec.acl("publishClientReceive", every),
                            ],
                        ),
                        dynsec.create_client(name, password, [name]),
                    ]
                )
            )
        finally:
            link.close()
        verify = stack.manager.fabric.signing_key.verify_key
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_observe,
            args=(
                child,
                stack.settings.mqtt_url,
                name,
                password,
                prefix,
                verify.kid,
                verify.public_base64,
            ),
            name="bench-observer",
            daemon=True,
        )
        self.process.start()
        child.close()
        ready = self._answer(60)
        if not ready.get("ok"):
            raise RuntimeError(f"the observer did not start: {ready}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError, EOFError):
                self.conn.send({"op": "stop"})
        if self.process is not None:
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
        with contextlib.suppress(Exception):  # best effort: a leftover account reads configs, nothing more
            link = self.stack.publisher("bench-observer-admin")
            try:
                link.control([dynsec.delete_client(self.name), dynsec.delete_role(self.name)])
            finally:
                link.close()

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.conn is not None
        if not self.conn.poll(timeout):
            raise TimeoutError(f"the observer did not answer within {timeout:.0f}s")
        answer: dict[str, Any] = self.conn.recv()
        return answer

    def wait(
        self, expected: dict[str, int], *, since: float, timeout: float, version: int | None = None
    ) -> dict[str, Any]:
        """Wait for a document with at least the expected serial on each topic, received after `since`;
        report the last arrival and the checks of what arrived."""
        assert self.conn is not None
        self.conn.send(
            {"op": "wait", "expected": expected, "since": since, "timeout": timeout, "version": version}
        )
        return self._answer(timeout + 60)


def _observe(
    conn: Connection, mqtt_url: str, username: str, password: str, prefix: str, kid: str, public: str
) -> None:
    """The observer process: record (time, topic, payload) of every message; check them when asked."""
    key = VerifyKey.from_base64(kid, public)
    received: list[tuple[float, str, bytes]] = []

    def handler(topic: str, payload: bytes) -> None:
        received.append((time.time(), topic, payload))  # nothing else on paho's thread

    link = BrokerLink(MqttAddress.parse(mqtt_url), username=username, password=password, client_id=username)
    link.subscribe(all_configs_filter(prefix), handler)
    try:
        link.connect(10)
    except Exception as exc:
        conn.send({"ok": False, "error": str(exc)})
        return
    conn.send({"ok": True})
    newest: dict[str, tuple[float, int, bytes]] = {}
    """The first arrival of the newest serial seen on each topic."""
    try:
        while True:
            request = conn.recv()
            if request["op"] != "wait":
                break
            conn.send(_wait(request, received, newest, key, prefix))
    except (EOFError, OSError):
        pass
    finally:
        link.close()


def _wait(
    request: dict[str, Any],
    received: list[tuple[float, str, bytes]],
    newest: dict[str, tuple[float, int, bytes]],
    key: VerifyKey,
    prefix: str,
) -> dict[str, Any]:
    expected: dict[str, int] = request["expected"]
    since: float = request["since"]
    deadline = time.monotonic() + request["timeout"]
    found: dict[str, tuple[float, int, bytes]] = {}
    while True:
        batch = received[:]
        del received[: len(batch)]
        for at, topic, payload in batch:
            if not payload:
                continue
            serial = int(orjson.loads(payload)["doc"]["serial"])
            held = newest.get(topic)
            if held is None or serial > held[1]:
                newest[topic] = (at, serial, payload)
            if at >= since and topic in expected and topic not in found and serial >= expected[topic]:
                found[topic] = (at, serial, payload)
        if len(found) == len(expected) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    checks = {"exact_serial": 0, "valid_signature": 0, "right_topic": 0, "right_version": 0}
    problems: list[str] = []
    for topic, (_, serial, payload) in found.items():
        try:
            doc = open_envelope(payload, key)
        except PolicycastError as exc:
            problems.append(f"{topic}: {exc}")
            continue
        checks["valid_signature"] += 1
        checks["exact_serial"] += serial == expected[topic] == doc["serial"]
        parsed = parse_topic(prefix, topic)
        checks["right_topic"] += (str(doc["group_id"]), str(doc["location_id"])) == (
            getattr(parsed, "group_id", None),
            getattr(parsed, "location_id", None),
        )
        version = request.get("version")
        checks["right_version"] += version is None or doc["policies"]["firewall"]["version"] == version
    times = [at for at, _, _ in found.values()]
    missing = sorted(set(expected) - set(found))
    return {
        "expected": len(expected),
        "arrived": len(found),
        **checks,
        "first_at": min(times, default=None),
        "last_at": max(times, default=None),
        "missing": missing[:5],
        "problems": problems[:5],
    }


def _find_counter(manager: ManagerThread) -> HeartbeatCounter:
    app: Any = manager.app.middleware_stack
    while app is not None:
        if isinstance(app, HeartbeatCounter):
            return app
        app = getattr(app, "app", None)
    raise RuntimeError("the heartbeat counter is not in the manager's middleware stack")


def publish_documents(link: BrokerLink, topics_and_payloads: list[tuple[str, bytes]]) -> float:
    """Publish straight to the broker as the bridge does (QoS 1, all in flight); returns the start time."""
    started = time.time()
    link.publish_many(
        [Publication(topic, payload, qos=1, retain=False) for topic, payload in topics_and_payloads]
    )
    return started


# --- the simulator as a child process ----------------------------------------------------------------


class SimProcess:
    """`policycast-agent simulate --control`: requests on its stdin, JSON-line answers on its stdout."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        command = [sys.executable, "-m", "agent_stub", "simulate", "--control", *argv]
        self.command = command
        log = log_path.open("ab")
        self.popen = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, env=_env()
        )
        log.close()
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="sim-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self._events.put(json.loads(line))
        self._events.put(None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"the simulator sent no {event!r} within {timeout:.0f}s; see {self.log_path}"
                )
            try:
                message = self._events.get(timeout=remaining)
            except queue.Empty:
                continue
            if message is None:
                raise RuntimeError(
                    f"the simulator exited ({self.popen.wait()}); see {self.log_path}:\n{self.tail()}"
                )
            if message.get("event") == "error":
                raise RuntimeError(f"the simulator refused a request: {message.get('detail')}")
            if message.get("event") == event:
                return message

    def request(self, op: str, timeout_s: float = 60.0, **fields: Any) -> dict[str, Any]:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps({"op": op, "timeout_s": timeout_s, **fields}).encode() + b"\n")
        self.popen.stdin.flush()
        return self.expect(op, timeout_s + 60)

    def stop(self, timeout: float = 120.0) -> dict[str, Any] | None:
        """Stop the fleet (sessions end cleanly); returns its final summary."""
        if self.popen.poll() is not None:
            return None
        summary = None
        try:
            assert self.popen.stdin is not None
            self.popen.stdin.write(b'{"op": "stop"}\n')
            self.popen.stdin.flush()
            summary = self.expect("stopped", timeout)
            self.popen.wait(30)
        except (TimeoutError, RuntimeError, OSError, subprocess.TimeoutExpired):
            self.kill()
        return summary

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Fleet:
    """A simulated fleet on a `Stack`: enrolled (once, kept), provisioned, started and ready."""

    def __init__(
        self,
        stack: Stack,
        agents: int,
        *,
        mode: str = "push",
        connect_rate: float = 500.0,
        extra: list[str] | None = None,
        ready_timeout: float | None = None,
    ) -> None:
        self.stack = stack
        self.agents = agents
        self.identities = stack.data_dir / "identities.json"
        self.log_path = stack.data_dir / "simulator.log"
        self.argv = [
            "--agents",
            str(agents),
            "--server",
            stack.url,
            "--admin-key",
            stack.admin_key,
            "--mode",
            mode,
            "--groups",
            str(GROUPS),
            "--locations",
            str(LOCATIONS),
            "--identities",
            str(self.identities),
            "--connect-rate",
            str(connect_rate),
            "--log-level",
            "ERROR",
            *(extra or []),
        ]
        assert stack.broker is not None
        self.argv += ["--mqtt-url", stack.broker.url]
        self.ready_timeout = ready_timeout or 120 + agents * 0.05
        self.process: SimProcess | None = None
        self.ready: dict[str, Any] = {}
        self.setup: dict[str, Any] = {}

    def enrol(self) -> None:
        """Enrol the agents the identities file lacks, and wait for the bridge to provision them."""
        began = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "agent_stub", "simulate", "--enrol-only", "--no-progress", *self.argv],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"enrolment failed:\n{result.stderr[-2000:]}")
        summary = json.loads(result.stdout)
        self.setup["enrolled_now"] = summary["enrolled_now"]
        self.setup["enrol_s"] = round(time.monotonic() - began, 1)
        if summary["enrolled_now"]:
            say(f"enrolled {summary['enrolled_now']} new agent(s) in {self.setup['enrol_s']}s")
        provision_s = self.stack.wait_provisioned(timeout=600 + self.agents * 0.2)
        self.setup["provision_wait_s"] = round(provision_s, 1)

    def start(self) -> dict[str, Any]:
        self.enrol()
        return self.launch()

    def wait_quiet(self, timeout: float = 300.0) -> float:
        """Until the manager hears next to no heartbeats and the simulator has none waiting to go out.

        The manager's count alone can be fooled by a lull: a storm once began while heartbeats queued
        during the fleet's start were still waiting for a connection, and they went out during it.
        """
        began = time.monotonic()
        while True:
            self.stack.wait_quiet(timeout=timeout)
            pending = self.sim.request("rates", since=time.time())["heartbeats_pending"]
            if pending == 0:
                return time.monotonic() - began
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"the simulator still has {pending} heartbeat(s) waiting to go out")
            time.sleep(0.5)

    def launch(self) -> dict[str, Any]:
        """Start the simulator (agents already enrolled and provisioned) and wait until it is ready."""
        say(f"starting {self.agents} simulated {'bare MQTT clients' if '--bare' in self.argv else 'agents'}")
        self.process = SimProcess(self.argv, self.log_path)
        self.ready = self.process.expect("ready", self.ready_timeout + 120)
        if not self.ready.get("ok"):
            raise RuntimeError(
                f"the fleet was not ready in {self.ready_timeout:.0f}s: {self.ready.get('documents')} "
                f"documents, {self.ready.get('push_sessions')} push sessions of {self.agents}"
            )
        self.setup["ready_s"] = self.ready["timings"].get("ready_s")
        self.setup["start_s"] = self.ready["timings"].get("start_s")
        say(f"fleet ready: {self.ready['push_sessions']} push sessions, {self.ready['documents']} documents")
        return self.ready

    @property
    def sim(self) -> SimProcess:
        assert self.process is not None
        return self.process

    def keys(self) -> list[str]:
        return sorted(k for k in self.ready["serials"] if k != "none")

    def stop(self) -> dict[str, Any] | None:
        return self.process.stop() if self.process is not None else None

    def __enter__(self) -> Fleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.stop()


@contextlib.contextmanager
def stack_and_fleet(
    args: argparse.Namespace, agents: int, **fleet_options: Any
) -> Iterator[tuple[Stack, Fleet]]:
    with Stack(work_dir(args)) as stack:
        stack.ensure_root_policy()
        with Fleet(stack, agents, **fleet_options) as fleet:
            yield stack, fleet


# --- results ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mosquitto = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        from broker_bridge.mosquitto import mosquitto_binary

        out = subprocess.run(
            [mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=5, check=False
        )
        mosquitto = (out.stdout or out.stderr).splitlines()[0].strip()
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mosquitto": mosquitto,
        "commit": commit,
        "load_avg_at_start": os.getloadavg(),
    }


def result_path(name: str, when: datetime | None = None) -> Path:
    stamp = (when or datetime.now(UTC)).strftime("%Y-%m-%dT%H%M%SZ")
    return RESULTS_DIR / f"{name}-{stamp}.json"


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = result_path(name)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return round(value / baseline, 2)


__all__ = [
    "DEFAULT_AGENTS",
    "FULL_AGENTS",
    "Fleet",
    "ManagerProbe",
    "SimProcess",
    "Stack",
    "fleet_size",
    "machine",
    "percentiles",
    "publish_documents",
    "ratio",
    "rss_bytes",
    "say",
    "stack_and_fleet",
    "wait_until",
    "write_result",
]
