"""`policycast plan` and `api.capacity`: capacity from the costs the benchmarks measured."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from api import capacity
from api.capacity import Costs, parse_duration, plan
from local_stack.cli import app

COSTS = Costs(
    measured_on="2026-01-01",
    machine="test machine",
    source="test",
    heartbeats_per_core_s=10_000,
    heartbeat_up_ip_bytes=600,
    heartbeat_down_ip_bytes=300,
    heartbeat_http_bytes=560,
    changed_heartbeat_down_ip_bytes=2_300,
    keepalive_ip_bytes_per_hour=9_600,
    keepalive_s=60,
    publish_ip_bytes=1_800,
    envelope_bytes=1_600,
)


@pytest.mark.parametrize(
    ("text", "seconds"), [("300", 300), ("300s", 300), ("5m", 300), ("5M", 300), ("1h", 3600), ("1.5h", 5400)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m", "-5m", "0", "0s", "five minutes"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_pull_plan_follows_from_the_costs():
    result = plan(300_000, "pull", 300, costs=COSTS)

    assert result.heartbeats_per_s == 1000
    assert result.api_cores_exact == pytest.approx(0.2)  # 1000/s of 10,000/s per core, at 50 %
    assert result.api_cores == 1
    assert result.broker_connections == 0
    assert result.steady_up_bytes_per_s == 600_000
    assert result.steady_down_bytes_per_s == 300_000
    assert result.steady_bits_per_s == 900_000 * 8
    assert result.bytes_per_day == 900_000 * 86_400
    assert result.change_bytes == 300_000 * 2_000  # the document, over an unchanged answer
    assert result.change_seconds == 300


def test_push_adds_connections_keepalives_and_publishes_at_once():
    pull, push = plan(36_000, "pull", 300, costs=COSTS), plan(36_000, "push", 300, costs=COSTS)

    assert push.heartbeats_per_s == pull.heartbeats_per_s  # push agents heartbeat too
    assert push.broker_connections == 36_000
    keepalive = 36_000 * 9_600 / 3600
    total_push = push.steady_up_bytes_per_s + push.steady_down_bytes_per_s
    assert total_push == pytest.approx(pull.steady_up_bytes_per_s + pull.steady_down_bytes_per_s + keepalive)
    assert push.change_bytes == 36_000 * 1_800
    assert push.change_seconds == 0


def test_cores_scale_with_agents_and_interval():
    assert plan(0, "pull", 300, costs=COSTS).api_cores == 0
    assert plan(1, "pull", 300, costs=COSTS).api_cores == 1
    big = plan(30_000_000, "pull", 300, costs=COSTS)  # 100,000/s
    assert big.api_cores == 20
    assert plan(30_000_000, "pull", 600, costs=COSTS).api_cores == 10
    assert plan(30_000_000, "pull", 300, costs=COSTS, utilisation=1.0).api_cores == 10


@pytest.mark.parametrize(
    "kwargs",
    [
        {"agents": -1, "mode": "pull", "heartbeat_s": 300},
        {"agents": 1, "mode": "pull", "heartbeat_s": 0},
        {"agents": 1, "mode": "carrier-pigeon", "heartbeat_s": 300},
        {"agents": 1, "mode": "pull", "heartbeat_s": 300, "utilisation": 0},
    ],
)
def test_impossible_plans_are_refused(kwargs):
    with pytest.raises(ValueError):
        plan(**kwargs, costs=COSTS)


def test_the_shipped_costs_say_when_and_where_they_were_measured():
    costs = capacity.measured_costs()

    assert costs.measured_on[:2] == "20" and len(costs.measured_on) == 10
    assert costs.machine and costs.source
    assert costs.heartbeats_per_core_s > 0
    assert 0 < costs.heartbeat_http_bytes < costs.heartbeat_up_ip_bytes + costs.heartbeat_down_ip_bytes
    assert costs.changed_heartbeat_down_ip_bytes > costs.heartbeat_down_ip_bytes
    assert costs.publish_ip_bytes > costs.envelope_bytes
    assert costs.keepalive_ip_bytes_per_hour > 0


def test_costs_are_made_from_benchmark_results():
    throughput = {
        "name": "heartbeat_throughput",
        "date": "2026-02-03T04:05:06+00:00",
        "machine": {"cpu": "CPU", "cores": 2, "python": "3.11.7"},
        "summary": {"heartbeat_rps_per_core": 12_345.6},
    }
    wire = {
        "name": "wire_cost",
        "date": "2026-02-03T05:00:00+00:00",
        "pull": {
            "unchanged_heartbeat": {
                "app_bytes_out": 400,
                "app_bytes_in": 160,
                "segments_out": 3,
                "segments_in": 2,
                "app_bytes": 560,
            },
            "changed_heartbeat": {"app_bytes_in": 1_800, "segments_in": 3},
        },
        "push": {
            "idle_per_agent_per_hour": {"ip_bytes": 9_600, "keepalive_s": 60},
            "policy_change": {"ip_bytes": 1_850},
            "envelope_bytes": 1_600,
        },
    }

    costs = Costs.from_dict(capacity.costs_from_results(throughput, wire))

    assert costs.measured_on == "2026-02-03"
    assert costs.machine == "CPU, 2 cores, Python 3.11.7"
    assert costs.heartbeats_per_core_s == 12_345.6
    assert costs.heartbeat_up_ip_bytes == 400 + 3 * 52
    assert costs.heartbeat_down_ip_bytes == 160 + 2 * 52
    assert costs.changed_heartbeat_down_ip_bytes == 1_800 + 3 * 52


runner = CliRunner()


def test_plan_prints_rate_bandwidth_connections_and_cores():
    result = runner.invoke(app, ["plan", "--agents", "100000", "--mode", "push", "--heartbeat", "5m"])

    assert result.exit_code == 0, result.output
    out = result.output
    assert "333.3 heartbeats/s" in out
    assert re.search(r"broker connections +100,000", out)
    assert "api cores" in out and "bit/s" in out
    assert capacity.measured_costs().measured_on in out


def test_plan_as_json_matches_the_model():
    result = runner.invoke(
        app, ["plan", "--agents", "3000", "--mode", "pull", "--heartbeat", "300", "--json"]
    )

    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["plan"] == plan(3000, "pull", 300).as_dict()
    assert printed["costs"]["machine"] == capacity.measured_costs().machine


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--agents", "10", "--heartbeat", "5x"],
        ["plan", "--agents", "10", "--heartbeat", "0m"],
        ["plan", "--agents", "-3"],
        ["plan", "--agents", "10", "--mode", "smoke"],
        ["plan"],
    ],
)
def test_plan_refuses_bad_input_with_a_message(argv):
    result = runner.invoke(app, argv)

    assert result.exit_code != 0
    assert "Traceback" not in result.output


def test_over_tls_costs_take_the_http_bytes_and_the_cold_tls_rate():
    """Benchmark 3 over TLS: `app_bytes` are TLS records, the HTTP bytes are `http_bytes`; benchmark 2
    with a cold phase: the rate with a new TLS connection per heartbeat, whose handshakes every
    heartbeat then carries."""
    throughput = {
        "name": "heartbeat_throughput",
        "date": "2026-12-03T04:05:06+00:00",
        "machine": {"cpu": "CPU", "cores": 2, "python": "3.11.7"},
        "summary": {"heartbeat_rps_per_core": 5_000.0, "cold_tls_heartbeat_rps_per_core": 600.0},
    }
    wire = {
        "name": "wire_cost",
        "date": "2026-12-03T05:00:00+00:00",
        "pull": {
            "connection": {
                "app_bytes_out": 597,
                "app_bytes_in": 1_712,
                "segments_out": 6,
                "segments_in": 4,
                "tls": {"version": "TLSv1.3"},
            },
            "unchanged_heartbeat": {
                "app_bytes_out": 270,
                "app_bytes_in": 203,
                "segments_out": 3,
                "segments_in": 3,
                "app_bytes": 473,
                "http_bytes": {"out": 226, "in": 159, "total": 385},
            },
            "changed_heartbeat": {"app_bytes_in": 2_452, "segments_in": 3},
        },
        "push": {
            "idle_per_agent_per_hour": {"ip_bytes": 12_240, "keepalive_s": 60},
            "policy_change": {"ip_bytes": 2_526},
            "envelope_bytes": 2_238,
        },
    }

    costs = Costs.from_dict(capacity.costs_from_results(throughput, wire))

    assert costs.heartbeat_http_bytes == 385  # not the 473 bytes of TLS records
    assert costs.heartbeats_per_core_s == 600.0
    assert costs.heartbeat_connection == "new-tls"
    assert (costs.connection_up_ip_bytes, costs.connection_down_ip_bytes) == (597 + 6 * 52, 1_712 + 4 * 52)
    result = plan(300_000, "pull", 300, costs=costs)
    assert result.api_cores_exact == pytest.approx(1000 / 600 / 0.5)
    assert result.steady_up_bytes_per_s == pytest.approx(1000 * (270 + 3 * 52 + 597 + 6 * 52))

    keep_alive = capacity.costs_from_results(
        {**throughput, "summary": {"heartbeat_rps_per_core": 5_000.0}}, wire
    )
    assert keep_alive["heartbeat_connection"] == "keep-alive"
    assert keep_alive["heartbeats_per_core_s"] == 5_000.0
    assert "connection_up_ip_bytes" not in keep_alive
