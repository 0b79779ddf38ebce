"""The broker authorisation benchmark, small: 120 agents written in bulk, a baseline of 40 through the
control API, and 120 NATS user JWTs tried on a real 3-node cluster. Asserts what the benchmark checks
and reports, never a time.

The same code as `python -m bench --only broker_authorisation`: every method's sample connected and
subscribed to its own group and was refused another's, the baseline's extrapolation is labelled, and
the result is what `write_result` writes.
"""

from __future__ import annotations

import argparse

import pytest

from bench import broker_authorisation
from bench.results import result_json
from tests.support.broker import require_mosquitto

pytestmark = [pytest.mark.timeout(120), pytest.mark.cluster]
AGENTS, BASELINE = 120, 40


def test_the_benchmark_authorises_every_method_and_labels_the_extrapolation() -> None:
    require_mosquitto()
    args = argparse.Namespace(agents=AGENTS, baseline_agents=BASELINE, full=False, plain=False, seed=0)

    result = broker_authorisation.run(args)

    assert result["transport"] == {"broker": "mqtts"}
    methods = {(m["engine"], m["method"]): m for m in result["measurements"]}
    assert set(methods) == {
        ("mosquitto", "control_api"),
        ("mosquitto", "control_api_batched"),
        ("mosquitto", "bulk_file"),
        ("nats", "jwt_mint"),
    }
    assert methods["mosquitto", "bulk_file"]["agents"] == AGENTS
    assert methods["mosquitto", "control_api"]["agents"] == BASELINE
    for measurement in methods.values():
        verified = measurement["verified"]
        assert verified["sampled"] == verified["connected_and_subscribed"] == verified["refused_other_group"]
        assert verified["sampled"] == min(broker_authorisation.SAMPLE, measurement["agents"])
    baseline = methods["mosquitto", "control_api"]
    assert len(baseline["curve"]) == broker_authorisation.CHECKPOINTS
    assert baseline["extrapolated"]["agents"] == AGENTS
    assert "EXTRAPOLATED" in baseline["extrapolated"]["label"]
    assert "EXTRAPOLATED" in result["summary"]["control_api_extrapolated_label"]
    assert result["summary"]["bulk_file_s"] > 0
    # NATS: nothing written to the broker; the sample spread over the 3 nodes, MQTT 3.1.1 (SUBACK 0x80)
    nats = methods["nats", "jwt_mint"]
    assert nats["agents"] == AGENTS
    assert nats["parts"]["broker_writes"] == 0
    assert nats["parts"]["cluster_nodes"] == nats["verified"]["nodes"] == 3
    assert result["summary"]["nats_agents_per_s"] > 0
    assert result["summary"]["nats_vs_control_api"] > 0
    assert '"broker_authorisation"' in result_json(result)


def test_the_fit_recovers_a_quadratic() -> None:
    curve = [(n, 0.5 + 0.002 * n + 3e-6 * n * n) for n in range(100, 1001, 100)]
    extrapolated = broker_authorisation.extrapolate(curve, 10_000)
    assert extrapolated is not None
    assert extrapolated["seconds"] == pytest.approx(0.5 + 20 + 300, rel=1e-6)
