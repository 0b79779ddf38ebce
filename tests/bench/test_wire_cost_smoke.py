"""Benchmark 3's harness, small: a few heartbeats and keep-alive rounds, over TLS and in plain.

The same code as `python -m bench.wire_cost` (a real `policycast serve`, the reference agent, the
hand-written client, a Mosquitto of its own), with few samples and a 1 s keep-alive. It asserts what the
counters must show, never a time: over TLS every heartbeat and ping carries TLS records around the same
HTTP and MQTT bytes, and the handshake is counted apart, once.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from bench import wire_cost

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
TLS13_RECORD = 5 + 1 + 16
"""A TLS 1.3 record's overhead: header, inner content type, AEAD tag."""


def _run(*, plain: bool) -> dict[str, Any]:
    args = argparse.Namespace(heartbeats=3, gap=0.3, keepalive=1, idle=2.5, quick=True, plain=plain)
    return wire_cost.run(args)


def test_over_tls_every_exchange_carries_its_records_and_the_handshake_is_apart() -> None:
    result = _run(plain=False)

    summary, pull, push = result["summary"], result["pull"], result["push"]
    assert result["config"]["tls"] is True
    assert summary["transport"] == {"pull": "https", "push": "mqtts"}
    assert pull["connection"]["tls"]["version"] == push["tls"]["version"] == "TLSv1.3"
    # the same lean HTTP heartbeat inside; the records around it: at least one each way, whole records
    unchanged = pull["unchanged_heartbeat"]
    http = unchanged["http_bytes"]["total"]
    assert http == summary["unchanged_heartbeat_bytes"] <= wire_cost.TARGET_BYTES
    overhead = summary["unchanged_heartbeat_tls_overhead_bytes"]
    assert overhead >= 2 * TLS13_RECORD and overhead % TLS13_RECORD == 0, overhead
    # the hand-written client sends its request in one write: one record up
    lean = pull["lean_client"]["same_body"]
    assert lean["app_bytes_out"] == lean["http_bytes"]["out"] + TLS13_RECORD
    # the handshake, once per connection: certificates and keys, far more than a heartbeat
    assert pull["connection"]["app_bytes"] > 1000 > unchanged["app_bytes"]
    assert pull["first_exchange"]["app_bytes"] > pull["connection"]["app_bytes"]
    # a keep-alive round: PINGREQ and PINGRESP, 2 bytes each, one record each
    assert push["keepalive_round"]["app_bytes"] == 2 * (2 + TLS13_RECORD)
    assert push["connection"]["app_bytes"] > 1000
    # the pushed document: the PUBLISH as the specification sizes it, inside records
    assert push["policy_change"]["app_bytes_in"] > push["publish_bytes_by_spec"]


def test_plain_counts_the_http_and_mqtt_bytes_themselves() -> None:
    result = _run(plain=True)

    summary, pull, push = result["summary"], result["pull"], result["push"]
    assert summary["transport"] == {"pull": "http", "push": "mqtt"}
    assert pull["connection"]["tls"] is None and push["tls"] is None
    unchanged = pull["unchanged_heartbeat"]
    # without TLS the kernel's count is the HTTP bytes exactly (the counters check the sizes)
    assert unchanged["app_bytes"] == unchanged["http_bytes"]["total"] == summary["unchanged_heartbeat_bytes"]
    assert summary["unchanged_heartbeat_tls_overhead_bytes"] == 0
    assert pull["connection"]["app_bytes"] == 0  # TCP's handshake carries no payload
    assert push["keepalive_round"]["app_bytes"] == 4
    assert push["policy_change"]["app_bytes_in"] == push["publish_bytes_by_spec"]
