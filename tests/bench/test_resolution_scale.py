"""Benchmark 5's harness, small: 30 groups x 3 locations, one round. Asserts correctness, never a time.

The same code as `python -m bench --only resolution_scale` (a real stack: Mosquitto with Policycast's
configuration, the manager, the bridge; the tree; the admin API's edit; the baseline; the wildcard
subscriber in its own process; the profiled edit): every (group, location) got exactly one new serial
in an outbox row that the bridge marked published, and the subscriber received every new document with
that serial, a valid signature, on its own topic.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import resolution_scale
from bench.group_tree import tree_levels

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
GROUPS = 30
DOCUMENTS = GROUPS * 3
SUBSCRIBER_CHECKS = ("arrived", "exact_serial", "valid_signature", "right_topic", "right_version")


def test_the_tree_has_the_stated_shape() -> None:
    assert tree_levels(1000, 10) == [1, 10, 100, 889]
    assert tree_levels(GROUPS, 10) == [1, 10, 19]
    assert sum(tree_levels(1234, 3)) == 1234


def test_resolution_scale_harness_publishes_every_document(tmp_path: Path) -> None:
    args = argparse.Namespace(groups=GROUPS, rounds=1, work_dir=tmp_path, fresh=False, seed=0)

    result = resolution_scale.run(args)

    json.dumps(result)  # what `python -m bench` writes
    assert result["name"] == resolution_scale.NAME == "resolution_scale"
    assert result["database"] == "sqlite"
    assert result["transport"] == {"manager": "https", "broker": "mqtts"}
    assert result["tree"]["groups"] == GROUPS and result["tree"]["documents"] == DOCUMENTS
    assert result["setup"]["levels"] == [1, 10, 19]
    (measured,) = result["rounds"]
    change, baseline = measured["policycast"], measured["baseline"]
    assert change["policy_version"] == 2  # the admin API took the one edit of a fresh policy
    # one outbox row per (group, location), each with a new serial, all marked published by the bridge
    assert change["outbox_rows"] == change["outbox_pairs"] == change["outbox_published"] == DOCUMENTS
    assert change["new_serial_everywhere"]
    # the subscriber got every new document: that serial, a valid signature, its own topic, new version
    for check in SUBSCRIBER_CHECKS:
        assert change["subscriber"][check] == DOCUMENTS, (check, change["subscriber"])
    assert change["subscriber"]["problems"] == [] and change["subscriber"]["missing"] == []
    # the baseline published the same documents, and the subscriber received them all
    assert baseline["messages"] == baseline["delivered"] == DOCUMENTS
    for check in SUBSCRIBER_CHECKS:
        assert baseline["subscriber"][check] == DOCUMENTS, (check, baseline["subscriber"])
    # every figure was measured (never compared with a time: the machines are shared)
    for key in ("time_to_outbox_s", "time_to_last_puback_s", "time_to_last_delivery_s"):
        assert change[key] is not None and change[key] > 0
    assert baseline["time_to_last_puback_s"] > 0
    assert set(result["median"]) == {"policycast", "baseline", "ratio_last_puback", "ratio_last_delivery"}
    assert result["median"]["ratio_last_puback"] is not None
    assert result["all_correct"] and result["met"]["correct"]
    # the profiled edit went through the same checks, and names where its time went
    where = result["where_the_time_goes"]
    assert where["change"]["outbox_rows"] == where["change"]["outbox_published"] == DOCUMENTS
    assert where["change"]["new_serial_everywhere"]
    assert {"load_tree", "sign_envelope", "allocate_serials"} <= set(where["phases"])
    assert where["top_cumulative"]
    assert {"machine", "command", "targets", "setup"} <= set(result)
