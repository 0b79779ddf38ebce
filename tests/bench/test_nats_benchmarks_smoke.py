"""The fleet benchmarks on a NATS cluster (issue [3/6]), tiny: push fan-out, a node killed under the
fleet, memory per connection. The same code as `python -m bench --only NAME --engine nats` on a real
3-node cluster, the manager and the bridge, in a throw-away work directory. Asserts what each benchmark
checks and reports (every agent converged, reconnected, the node rejoined), never a time.

One stack for the module: the fleet (enrolled once) is shared; each benchmark starts its own stack on
the same work directory, as the kept state of `python -m bench` is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import memory, push_fanout, reconnect_storm

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.timeout(300)]
AGENTS = 24


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-nats")


def _args(work: Path, **extra: object) -> argparse.Namespace:
    return argparse.Namespace(
        agents=AGENTS,
        full=False,
        rounds=1,
        fresh=False,
        work_dir=work,
        seed=0,
        engine="nats",
        broker_nodes=3,
        connect_rate=None,
        **extra,
    )


def test_push_fanout_on_a_nats_cluster_converges(work: Path) -> None:
    result = push_fanout.run(_args(work))

    assert result["engine"] == "nats" and result["broker_nodes"] == 3 and result["delivery_qos"] == 0
    assert result["command"].endswith("--engine nats --broker-nodes 3")
    (measured,) = result["rounds"]
    assert measured["baseline"]["agents"] == measured["baseline"]["received"] == AGENTS
    assert measured["policycast"]["agents"] == measured["policycast"]["converged"] == AGENTS
    assert result["all_converged"] and result["all_received_baseline"] and result["all_observed"]
    assert result["manager_view"]["up_to_date"] == AGENTS
    # the agents spread over the nodes (each picks a URL at random): every node holds some
    per_node = result["connections_per_node"]
    assert len(per_node) == 3 and all(count and count > 0 for count in per_node)
    assert sum(per_node) >= AGENTS


def test_a_node_killed_under_the_fleet_every_agent_comes_back_and_converges(work: Path) -> None:
    result = reconnect_storm.run(_args(work))

    scenario = result["scenarios"]["node_killed"]
    assert result["engine"] == "nats"
    assert scenario["all_back_and_converged"], result["storms"]["agents"]
    assert scenario["agents_all_connected_s"] is not None and scenario["bare_all_connected_s"] is not None
    assert scenario["agents_all_hold_change_s"] is not None
    for kind in ("agents", "bare_mqtt_baseline"):
        storm = result["storms"][kind]
        # the killed node's agents (it held some) came back on the others
        assert storm["connections_per_node_before"][reconnect_storm.KILLED_NODE] > 0
        assert storm["reconnected"] > 0
        assert storm["push_sessions_after"] == AGENTS
    assert result["storms"]["agents"]["converged"] == AGENTS
    assert scenario["node_rejoined"], (
        result["storms"]["agents"]["restart"],
        result["storms"]["bare_mqtt_baseline"]["restart"],
    )


def test_memory_on_a_nats_cluster_per_node(work: Path) -> None:
    result = memory.run(_args(work))

    assert result["engine"] == "nats"
    assert result["agents_run"]["push_sessions"] == result["bare_run"]["push_sessions"] == AGENTS
    nodes = result["agents_run"]["broker_nodes"]
    assert len(nodes) == 3 and sum(n["connections_added"] or 0 for n in nodes) >= AGENTS
    assert result["broker_rss_connected_bytes"] > 0
    assert len(result["broker_per_connection_bytes_by_node"]) == 3
