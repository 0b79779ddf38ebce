"""Helpers for agent tests: signed documents, an identity that pins the test key, tiny intervals, and the
agent's own account on the broker under test (`broker_identity`, with a `tests.support.engines.PushBroker`:
a Mosquitto account or a NATS JWT)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent_stub.state import FileStateStore, Identity, StoredMqttCredentials
from fabric_core.settings import AgentSettings
from fabric_core.signing import SigningKey
from fabric_core.wire import MqttCredentials, SigningKeyInfo
from tests.agent_stub.agent_process import HeartbeatServer
from tests.support.broker import Broker
from tests.support.engines import PushBroker, mosquitto_agent_credentials, mosquitto_trusted_cas

AGENT_ID = "agent-1"
GROUP_ID = 3
LOCATION_ID = 7
WAIT_S = 5.0
"""How long the agent tests wait for something (`tests.support.waiting.wait_for_async`) before failing.

It only bounds a failure, so it is generous (CI machines are shared and busy): the tests set the
behaviour apart from its alternative by intervals far longer (a minute's heartbeat, an hour's).
"""


def make_doc(
    *,
    serial: int = 1,
    group_id: int = GROUP_ID,
    location_id: int = LOCATION_ID,
    mode: str = "pull",
    heartbeat_s: int = 300,
) -> dict[str, Any]:
    """A valid effective document (DESIGN.md §5)."""
    return {
        "serial": serial,
        "group_id": group_id,
        "location_id": location_id,
        "issued_at": "2024-05-01T12:00:00+00:00",
        "communication": {
            "mode": mode,
            "heartbeat_s": heartbeat_s,
            "download_enabled": True,
            "randomize_s": 0,
        },
        "locations": [{"id": location_id, "name": "Default", "is_default": True, "conditions": []}],
        "policies": {
            "firewall": {
                "id": 11,
                "name": "Office firewall",
                "version": 2,
                "source_group_id": 1,
                "scope": "group",
                "body": {"rules": [{"allow": "tcp/443"}]},
            }
        },
        "content": {},
    }


def make_identity(
    key: SigningKey,
    *,
    agent_id: str = AGENT_ID,
    group_id: int = GROUP_ID,
    mqtt_url: str | None = None,
    mqtt_password: str = "mqtt-s3cret",
    mqtt: MqttCredentials | None = None,
) -> Identity:
    """The test agent; with `mqtt_url` (an account named after it) or `mqtt` (any credentials), it also
    has broker credentials (push mode possible)."""
    verify = key.verify_key
    stored = StoredMqttCredentials.from_wire(mqtt)
    if mqtt_url is not None:
        stored = StoredMqttCredentials(url=mqtt_url, username=agent_id, password=mqtt_password)
    return Identity(
        agent_id=agent_id,
        secret="s3cret",
        server="http://manager.test",
        group_id=group_id,
        signing_key=SigningKeyInfo(kid=verify.kid, public_key=verify.public_base64),
        mqtt=stored,
        hostname="host-1",
    )


@contextlib.asynccontextmanager
async def running(
    loop: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    *,
    stop_within: float,
    stop_at_end: bool = True,
) -> AsyncIterator[asyncio.Task[None]]:
    """Run `loop(stop)` (a pull, push or runtime loop) as a task while the body of the `async with` drives
    it; then set `stop` (unless `stop_at_end` is false: the body expects the loop to end by itself) and
    wait for the task to end, failing after `stop_within` seconds (a loop that ignored stop would run on)."""
    stop = asyncio.Event()
    task = asyncio.create_task(loop(stop))
    try:
        yield task
    finally:
        if stop_at_end:
            stop.set()
        await asyncio.wait_for(task, timeout=stop_within)


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """`policycast-agent run` configures the root logger (force=True) on CliRunner's stderr, which is
    closed after the test: put the handlers back so later tests do not log into a closed file."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def signing_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def identity(signing_key: SigningKey) -> Identity:
    return make_identity(signing_key)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def file_store(state_dir: Path, identity: Identity) -> FileStateStore:
    store = FileStateStore(state_dir)
    store.save_identity(identity)
    return store


@pytest.fixture
def settings(state_dir: Path) -> AgentSettings:
    return AgentSettings(state_dir=state_dir, retry_min_s=0.01, retry_max_s=0.04, request_timeout_s=1.0)


@pytest.fixture
def push_settings(state_dir: Path) -> AgentSettings:
    """Tiny retry and reconnect intervals; keep-alive at its minimum."""
    return AgentSettings(
        state_dir=state_dir,
        retry_min_s=0.01,
        retry_max_s=0.04,
        request_timeout_s=1.0,
        reconnect_min_s=0.02,
        reconnect_max_s=0.1,
        mqtt_keepalive_s=5,
        mqtt_session_expiry_s=60,
    )


def broker_identity(
    key: SigningKey, broker: PushBroker | Broker, *, agent_id: str = AGENT_ID, group_id: int = GROUP_ID
) -> Identity:
    """The test agent with its own account on `broker` (a `PushBroker`, or the `mosquitto` fixture's
    `Broker`), as enrolment hands it out (Mosquitto: provisioned as the bridge does; NATS: a JWT): it
    may read its group's config topics and its cmd topic, and write its state topic; nothing else. The
    broker's CA is the identity's trust (`Identity.trusted_cas`)."""
    if isinstance(broker, Broker):  # `MosquittoBroker` is one too
        credentials = mosquitto_agent_credentials(broker, agent_id, group_id)
        trusted = mosquitto_trusted_cas(broker)
    else:
        credentials, trusted = broker.agent_credentials(agent_id, group_id), broker.trusted_cas
    identity = make_identity(key, agent_id=agent_id, group_id=group_id, mqtt=credentials)
    # Over TLS the agent trusts the broker's CA only, as if it had pinned it at enrolment.
    return identity.model_copy(update={"trusted_cas": trusted})


@pytest.fixture
def http_manager(signing_key: SigningKey) -> Iterator[str]:
    """The fake manager's URL; what it received is in `HeartbeatServer.heartbeats`."""
    HeartbeatServer.envelope = signing_key.sign_envelope(make_doc(serial=42))
    HeartbeatServer.heartbeats = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), HeartbeatServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
