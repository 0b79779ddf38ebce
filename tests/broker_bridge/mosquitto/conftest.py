"""Mosquitto tests: the two ways agent accounts are made (`provisioning`), and the accounts a test
declares (`@agents(a1=1, b1=2)`, made by `passwords` along the path of the run)."""

from __future__ import annotations

import pytest

from tests.support.broker import Broker

PATHS = ("control_api", "bulk_file")
"""One by one through the control API (`Broker.provision`, as the bridge), or written into the stopped
broker's file at once (`Broker.provision_many`, as `broker-config --with-agents`)."""

agents = pytest.mark.agents
"""`@agents(a1=1, b1=2)`: the test's agent accounts, agent id = group id."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "agents(**groups): agent accounts a Mosquitto test needs")


@pytest.fixture(params=PATHS)
def provisioning(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def passwords(mosquitto: Broker, provisioning: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """The accounts the test declares with `@agents(...)`, made along `provisioning`; their passwords."""
    marker = request.node.get_closest_marker("agents")
    wanted: dict[str, str | int] = dict(marker.kwargs) if marker else {}
    if provisioning == "bulk_file":
        return mosquitto.provision_many(wanted)
    return {agent_id: mosquitto.provision(agent_id, group_id) for agent_id, group_id in wanted.items()}
