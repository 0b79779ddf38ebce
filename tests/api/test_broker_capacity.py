"""`policycast plan --engine`: what a push fleet costs its broker on Mosquitto and on a NATS cluster."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from api.broker_capacity import BrokerCosts, broker_costs, broker_plan
from local_stack.cli import app

runner = CliRunner()

NATS = BrokerCosts(
    engine="nats",
    source="test",
    rss_per_agent_bytes=50_000,
    connects_per_s=2_000,
    authorise_per_s=10_000,
    authorise_grows_with_fleet=False,
    authorise_measured_at=10_000,
    max_nodes=None,
)
MOSQUITTO = BrokerCosts(
    engine="mosquitto",
    source="test",
    rss_per_agent_bytes=10_000,
    connects_per_s=10_000,
    authorise_per_s=50,
    authorise_grows_with_fleet=True,
    authorise_measured_at=2_000,
    max_nodes=1,
)


def test_a_nats_cluster_has_three_nodes_and_rehomes_a_lost_nodes_agents_on_the_others():
    result = broker_plan(30_000, "nats", costs=NATS)

    assert result.nodes == 3
    assert result.agents_per_node == 10_000
    assert result.rss_bytes_per_node == 10_000 * 50_000
    assert result.rehome_seconds == pytest.approx(10_000 / (2_000 * 2))
    assert result.authorise_seconds == pytest.approx(3.0)
    assert not result.authorise_estimate_only


def test_more_nodes_share_the_fleet_and_the_reconnects():
    three, six = broker_plan(60_000, "nats", costs=NATS), broker_plan(60_000, "nats", nodes=6, costs=NATS)

    assert six.agents_per_node == three.agents_per_node / 2
    assert six.rehome_seconds is not None and three.rehome_seconds is not None
    assert six.rehome_seconds < three.rehome_seconds


def test_mosquitto_is_one_node_without_failover_and_its_accounts_cost_more_as_the_fleet_grows():
    small = broker_plan(2_000, "mosquitto", costs=MOSQUITTO)
    large = broker_plan(20_000, "mosquitto", costs=MOSQUITTO)

    assert small.nodes == large.nodes == 1
    assert large.rehome_seconds is None
    assert small.authorise_seconds == pytest.approx(40.0) and not small.authorise_estimate_only
    assert large.authorise_estimate_only
    assert large.authorise_seconds == pytest.approx(40.0 * 10 * 10)  # quadratic


def test_mosquitto_cannot_be_planned_as_a_cluster():
    with pytest.raises(ValueError, match="at most 1 node"):
        broker_plan(1_000, "mosquitto", nodes=3, costs=MOSQUITTO)


def test_the_shipped_costs_cover_both_engines_and_say_where_they_come_from():
    costs = broker_costs()

    assert set(costs) == {"mosquitto", "nats"}
    assert all(c.source and c.rss_per_agent_bytes > 0 and c.connects_per_s > 0 for c in costs.values())


def test_plan_names_the_engine_its_nodes_and_what_a_lost_node_costs():
    result = runner.invoke(app, ["plan", "--agents", "30000", "--engine", "nats"])

    assert result.exit_code == 0, result.output
    assert "NATS, 3 nodes" in result.output
    assert "reconnect to the other 2" in result.output


def test_plan_as_json_carries_the_broker_plan_in_push_mode_only():
    push = json.loads(runner.invoke(app, ["plan", "--agents", "900", "--engine", "nats", "--json"]).output)
    pull = json.loads(runner.invoke(app, ["plan", "--agents", "900", "--mode", "pull", "--json"]).output)

    assert push["broker"] == broker_plan(900, "nats").as_dict()
    assert "broker" not in pull


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--agents", "10", "--engine", "rabbitmq"],
        ["plan", "--agents", "10", "--engine", "mosquitto", "--broker-nodes", "3"],
        ["plan", "--agents", "10", "--engine", "nats", "--broker-nodes", "0"],
    ],
)
def test_plan_refuses_an_unknown_engine_or_impossible_nodes_with_a_message(argv):
    result = runner.invoke(app, argv)

    assert result.exit_code != 0
    assert "Traceback" not in result.output
