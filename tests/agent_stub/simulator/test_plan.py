"""The simulator's plan: groups, sites and the identities file kept between runs."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent_stub.simulator.plan import (
    FleetPlan,
    IdentitiesFile,
    SimIdentity,
    key_text,
    load_identities,
    parse_key,
    save_identities,
    site_name,
)
from agent_stub.state import Identity


def test_a_plan_names_groups_and_spreads_agents_over_sites() -> None:
    plan = FleetPlan(agents=12, server="http://manager.test", groups=3, locations=2, mode="mix")
    assert [plan.group_name(i) for i in range(3)] == ["sim-01", "sim-02", "sim-03"]
    assert [plan.mode_of_group(i) for i in range(3)] == ["push", "pull", "push"]
    # round-robin over the groups first, then over the locations within each group
    assert [plan.site_of(i) for i in range(12)] == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1]
    tokens = FleetPlan(agents=4, server="http://manager.test", tokens=("a", "b"), locations=3)
    assert [tokens.site_of(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert site_name(2) == "site-2"
    assert parse_key(key_text((3, 7))) == (3, 7) and key_text((3, 7)) == "3/7"


def test_identities_are_kept_0600_and_read_back(tmp_path: Path, identity: Identity) -> None:
    path = tmp_path / "kept" / "identities.json"
    agents = [SimIdentity(identity=identity, site=0), SimIdentity(identity=identity, site=1)]

    save_identities(path, "http://manager.test", agents)

    assert load_identities(path) == agents
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # every agent's secret is in it
    assert [p.name for p in path.parent.iterdir()] == ["identities.json"]
    assert load_identities(None) == [] and load_identities(tmp_path / "none.json") == []


def test_an_identities_file_of_another_version_is_refused(tmp_path: Path, identity: Identity) -> None:
    path = tmp_path / "identities.json"
    stored = IdentitiesFile(version=2, server="http://manager.test", agents=[SimIdentity(identity=identity)])
    path.write_text(stored.model_dump_json())
    with pytest.raises(ValueError, match="identities file version 2, expected 1"):
        load_identities(path)
