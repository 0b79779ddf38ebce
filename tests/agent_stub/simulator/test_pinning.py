"""The fleet simulator against an HTTPS manager: one CA pinned for the whole fleet, from the join tokens,
`--ca-hash` or `--ca-file`; the admin API verified with it too."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_stub.errors import TrustError
from agent_stub.simulator.pinning import fleet_trust
from agent_stub.simulator.plan import FleetPlan
from fabric_core.tls import ManagerCA, ca_hash
from tests.support.processes import Manager, agent_cli, python_env

ADMIN_KEY = "pck_sim-trust"
A, B = ManagerCA.generate(), ManagerCA.generate()


def _settle(
    plan: FleetPlan, tokens: list[str], initial: list[str] | None = None
) -> tuple[list[str], list[str]]:
    return asyncio.run(fleet_trust(plan, tokens, initial=initial or [], known=[], timeout_s=1))


def test_the_tokens_lose_their_hash_and_the_ca_file_serves_as_the_pin() -> None:
    plan = FleetPlan(agents=2, server="https://m.test")
    pem = A.certificate_pem.decode()
    bare, cas = _settle(plan, [f"pcet_1.{A.hash}", f"pcet_2.{A.hash}"], [pem, B.certificate_pem.decode()])
    assert (bare, cas) == (["pcet_1", "pcet_2"], [pem])  # the pinned one of the file: nothing fetched


def test_one_fleet_pins_one_ca() -> None:
    plan = FleetPlan(agents=2, server="https://m.test")
    with pytest.raises(TrustError, match="pin different CAs"):
        _settle(plan, [f"pcet_1.{A.hash}", f"pcet_2.{B.hash}"])
    with pytest.raises(TrustError, match="pin different CAs"):
        _settle(FleetPlan(agents=1, server="https://m.test", ca_hash=B.hash), [f"pcet_1.{A.hash}"])


def test_https_needs_something_to_trust_and_http_trusts_nothing() -> None:
    with pytest.raises(TrustError, match="nothing says which CA to trust"):
        _settle(FleetPlan(agents=1, server="https://m.test"), ["pcet_1"])
    assert _settle(FleetPlan(agents=1, server="http://m.test"), [f"pcet_1.{A.hash}"]) == (["pcet_1"], [])


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    with Manager(tmp_path / "manager", tmp_path, admin_key=ADMIN_KEY, tls=True) as manager:
        yield manager


def _simulate(*args: str) -> dict[str, Any]:
    argv = agent_cli("simulate", "--no-progress", "--ready-timeout", "60", *args)
    result = subprocess.run(argv, env=python_env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def _trusted(identities: Path) -> set[str]:
    agents = json.loads(identities.read_text())["agents"]
    return {ca_hash(pem.encode()) for agent in agents for pem in agent["identity"]["trusted_cas"]}


def test_a_fleet_runs_against_an_https_manager_with_its_ca_file(manager: Manager, tmp_path: Path) -> None:
    assert manager.ca is not None
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(manager.ca.certificate_pem)
    identities = tmp_path / "identities.json"
    summary = _simulate(
        *("--agents", "3", "--server", manager.url, "--admin-key", ADMIN_KEY, "--ca-file", str(ca_file)),
        *("--mode", "pull", "--groups", "1", "--locations", "1", "--duration", "0"),
        *("--identities", str(identities)),
    )
    assert summary["ready"] and summary["documents"] == 3 and summary["heartbeats"]["failures"] == 0
    assert _trusted(identities) == {manager.ca.hash}


def test_a_fleet_pins_the_ca_of_its_join_tokens(manager: Manager, tmp_path: Path) -> None:
    assert manager.ca is not None
    identities = tmp_path / "identities.json"
    token = manager.admin.join_token(manager.root())
    summary = _simulate(
        "--agents",
        "2",
        "--server",
        manager.url,
        "--token",
        token,
        "--enrol-only",
        "--identities",
        str(identities),
    )
    assert summary["enrolled_now"] == 2
    assert _trusted(identities) == {manager.ca.hash}
