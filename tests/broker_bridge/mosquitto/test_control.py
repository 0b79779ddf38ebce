"""Dynamic-security control calls over a `BrokerLink` (`mosquitto.control`), and their errors
(`mosquitto.dynsec`), against a real Mosquitto."""

from __future__ import annotations

import threading

import pytest

from broker_bridge.broker import BrokerLink
from broker_bridge.errors import DynsecError
from broker_bridge.mosquitto import dynsec
from broker_bridge.mosquitto.control import control
from tests.support.broker import Broker


def test_control_calls_of_two_links_do_not_mix(mosquitto: Broker, bridge: BrokerLink) -> None:
    other = mosquitto.link("bridge-2")
    results: dict[str, list[dict[str, object]]] = {}

    def create(link: BrokerLink, role: str) -> None:
        results[role] = control(link, [dynsec.create_role(role, []), dynsec.get_role(role)])

    threads = [
        threading.Thread(target=create, args=(link, f"r-{name}-{i}"))
        for i in range(10)
        for name, link in (("a", bridge), ("b", other))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 20
    for role, responses in results.items():
        dynsec.check(responses)
        assert [r["command"] for r in responses] == ["createRole", "getRole"]
        assert responses[1]["data"]["role"]["rolename"] == role  # type: ignore[index]


def test_dynsec_errors_are_distinguishable(bridge: BrokerLink) -> None:
    dynsec.check(control(bridge, [dynsec.create_role("r1", [])]))
    with pytest.raises(DynsecError) as exists:
        dynsec.check(control(bridge, [dynsec.create_role("r1", [])]))
    assert exists.value.already_exists and not exists.value.not_found
    assert exists.value.command == "createRole"
    with pytest.raises(DynsecError) as missing:
        dynsec.check(control(bridge, [dynsec.delete_client("nobody")]))
    assert missing.value.not_found and not missing.value.already_exists
