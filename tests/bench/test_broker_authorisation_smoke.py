"""The broker authorisation benchmark, small: 120 agents written in bulk, a baseline of 40 through the
control API. Asserts what the benchmark checks and reports, never a time.

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

pytestmark = pytest.mark.timeout(120)
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
    assert '"broker_authorisation"' in result_json(result)


def test_the_fit_recovers_a_quadratic() -> None:
    curve = [(n, 0.5 + 0.002 * n + 3e-6 * n * n) for n in range(100, 1001, 100)]
    extrapolated = broker_authorisation.extrapolate(curve, 10_000)
    assert extrapolated is not None
    assert extrapolated["seconds"] == pytest.approx(0.5 + 20 + 300, rel=1e-6)
