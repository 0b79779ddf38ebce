"""The bridge's /metrics, served on its own port by the real bridge (on its thread, as `policycast up`
runs it) with the in-process manager and a real broker on each engine: documents published and their
latency, state messages ingested and dropped, the outbox, the convergence of an agent whose new serial
the bridge's ingest recorded; a port turned off or taken."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator

import httpx
import orjson
import pytest

from broker_bridge.engine import engine_for
from broker_bridge.service import Bridge, BridgeThread
from fabric_core.settings import Settings
from fabric_core.topics import config_topic, state_topic
from tests.support.metrics import Samples, scrape
from tests.support.stack import Stack
from tests.support.waiting import wait_for

PREFIX = "policycast"


@pytest.fixture(autouse=True)
def fresh_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Metrics read from SQL at every scrape (the stack's settings read the environment)."""
    monkeypatch.setenv("POLICYCAST_METRICS_CACHE_S", "0")


def bridge_url(thread: BridgeThread) -> str:
    address = wait_for(lambda: thread.bridge.metrics.address, timeout=10, what="the bridge's metrics port")
    return f"http://{address[0]}:{address[1]}/metrics"


def scrape_bridge(thread: BridgeThread) -> Samples:
    with httpx.Client(timeout=5) as client:
        return scrape(client, bridge_url(thread))


def test_the_bridge_serves_its_metrics_on_its_port(stack: Stack) -> None:
    admin = stack.admin
    root = admin.root()["id"]
    location = admin.default_location(root)["id"]
    agent, client = stack.push_agent(root)
    topic = config_topic(PREFIX, root, location)
    assert not client.subscribe(topic).is_failure
    client.expect(topic, timeout=5)  # the current document, retained
    samples = scrape_bridge(stack.bridge)
    assert all(name.startswith("policycast_") for name in samples.families)
    assert samples.families["policycast_publish_latency_seconds"].type == "histogram"
    assert samples.families["policycast_convergence_seconds"].type == "histogram"
    before = samples

    # A change: its documents published, acknowledged, and the outbox empty again.
    admin.assign(root, admin.policy("fw", "firewall", {"default": "deny"}))
    serial = admin.effective(root)["serial"]
    published = wait_for(
        lambda: scrape_bridge(stack.bridge),
        until=lambda s: (
            s.value("policycast_outbox_depth") == 0
            and s.value("policycast_documents_published_total")
            > before.value("policycast_documents_published_total")
        ),
        timeout=10,
        what="the change published",
    )
    grew = published.value("policycast_documents_published_total") - before.value(
        "policycast_documents_published_total"
    )
    assert grew >= 1
    assert (
        published.value("policycast_publish_latency_seconds_count")
        - before.value("policycast_publish_latency_seconds_count")
        == grew
    )
    assert published.value("policycast_publish_latency_seconds_bucket", le="+Inf") == published.value(
        "policycast_publish_latency_seconds_count"
    )
    assert published.value("policycast_outbox_oldest_age_seconds") == 0

    # The agent reports the new serial on its state topic: the bridge's ingest records the advance.
    state = state_topic(PREFIX, agent.id)
    held = {
        "agent_id": agent.id,
        "online": True,
        "serial": serial - 1,
        "location_id": location,
        "mode": "push",
    }
    assert not client.publish(state, orjson.dumps(held)).is_failure  # what it held before
    wait_for(
        lambda: admin.agent(agent.id)["serial"] == serial - 1, timeout=10, what="the state message ingested"
    )
    assert not client.publish(state, orjson.dumps({**held, "serial": serial})).is_failure
    assert not client.publish(state, b"not json").is_failure
    after = wait_for(
        lambda: scrape_bridge(stack.bridge),
        until=lambda s: s.value("policycast_convergence_seconds_count") == 1,
        timeout=10,
        what="the convergence observed by the bridge",
    )
    assert after.value("policycast_state_messages_total", outcome="ingested") == 2
    assert after.value("policycast_state_messages_total", outcome="dropped") == 1
    assert scrape(stack.client).value("policycast_convergence_seconds_count") == 0  # the api saw none

    address = stack.bridge.bridge.metrics.address
    assert address is not None
    stack.bridge.stop()  # stopped with the bridge
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{address[0]}:{address[1]}/metrics", timeout=2)


def _bridge(stack: Stack, **settings: object) -> Bridge:
    fabric = stack.fabric
    chosen: Settings = fabric.settings.model_copy(update=settings)
    link = stack.broker.link(f"bridge-{secrets.token_hex(3)}")
    return Bridge(
        settings=chosen,
        engine=fabric.engine,
        broker=engine_for(chosen, fabric.signing_key),
        link=link,
    )


def wait_published(bridge: Bridge) -> None:
    wait_for(lambda: bridge.published > 0, timeout=10, what="the bridge publishing without metrics")


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def test_metrics_turned_off_or_on_a_taken_port_leave_the_bridge_working(
    stack: Stack, taken_port: int
) -> None:
    stack.bridge.stop()
    admin = stack.admin
    root = admin.root()["id"]
    for settings in ({"bridge_metrics_port": None}, {"bridge_metrics_port": taken_port}):
        running = BridgeThread(_bridge(stack, **settings)).start()
        try:
            admin.assign(root, admin.policy(f"fw-{secrets.token_hex(3)}", "firewall", {}))
            wait_published(running.bridge)
            assert running.bridge.metrics.address is None
        finally:
            running.stop()
        assert running.error is None
