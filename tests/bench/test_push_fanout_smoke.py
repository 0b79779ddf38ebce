"""Benchmark 1's harness, small: 200 push agents, one round. Asserts correctness, never a time.

The same code as `python -m bench --only push_fanout` (stack, simulator process, baseline, change), on
a throw-away work directory: every agent handled the baseline's messages and applied the change, the
manager answered every request as expected and sees every agent up to date.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import push_fanout

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
AGENTS = 200


def test_push_fanout_harness_converges(tmp_path: Path) -> None:
    args = argparse.Namespace(agents=AGENTS, full=False, rounds=1, fresh=False, work_dir=tmp_path, seed=0)

    result = push_fanout.run(args)

    assert result["agents"] == AGENTS
    # as production runs: the admin API, the simulator and the observer over HTTPS and MQTT over TLS,
    # trusting the run's CA only (a client that did not could not have got this far)
    assert result["transport"] == {"manager": "https", "broker": "mqtts"}
    (measured,) = result["rounds"]
    assert measured["policy_version"] == 2  # the admin API took the one edit of a fresh policy
    assert measured["baseline"]["agents"] == measured["baseline"]["received"] == AGENTS
    assert measured["policycast"]["agents"] == measured["policycast"]["converged"] == AGENTS
    assert result["all_converged"] and result["all_received_baseline"]
    # one more subscriber on every config topic saw each new document, signed, with its new serial
    observed = measured["policycast"]["observer"]
    assert observed["arrived"] == observed["valid_signature"] == observed["exact_serial"]
    assert observed["arrived"] == observed["expected"]
    assert observed["expected"] == len(measured["policycast"]["by_key_s"]) > 0
    assert result["all_observed"]
    assert result["median"]["policycast"]["p99"] is not None  # every agent had a latency
    # the operator's view: everyone enrolled, on push, online, holding the current serial
    assert result["manager_view"] == {
        "agents_listed": AGENTS,
        "up_to_date": AGENTS,
        "push": AGENTS,
        "online": AGENTS,
    }
    # no agent ever failed a heartbeat or a connect, and each connected once
    simulator = result["simulator"]
    assert simulator["heartbeats"]["failures"] == 0
    assert simulator["mqtt"]["connect_failures"] == 0
    assert simulator["mqtt"]["sessions"] >= AGENTS
    assert result["setup"]["enrolled_now"] == AGENTS
