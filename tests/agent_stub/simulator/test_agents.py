"""The simulator's agents take the delivery their broker engine asks for, as a real agent does."""

from __future__ import annotations

import asyncio

import pytest

from agent_stub.simulator.agents import BareAgent
from agent_stub.simulator.fleet import SimulatedFleet
from agent_stub.simulator.plan import FleetPlan, SimIdentity
from agent_stub.state import Identity
from fabric_core.settings import AgentSettings
from fabric_core.signing import SigningKey
from fabric_core.topics import cmd_topic, config_topic
from fabric_core.wire import MqttDelivery
from tests.agent_stub.conftest import WAIT_S, make_identity
from tests.agent_stub.fakes import PREFIX, Broker
from tests.support.waiting import wait_for_async

KEY = (3, 7)


def _identity(delivery: MqttDelivery | None) -> Identity:
    identity = make_identity(SigningKey.generate(), mqtt_url="mqtt://broker.test:1883")
    if delivery is None or identity.mqtt is None:
        return identity
    return identity.model_copy(update={"mqtt": identity.mqtt.model_copy(update={"delivery": delivery})})


@pytest.mark.parametrize(
    ("delivery", "qos", "clean_start"),
    [(None, 1, False), (MqttDelivery(qos=0, persistent_session=False), 0, True)],
    ids=["default", "qos-0-clean"],
)
def test_a_bare_client_subscribes_as_the_delivery_says(
    push_settings: AgentSettings, delivery: MqttDelivery | None, qos: int, clean_start: bool
) -> None:
    broker = Broker()

    async def scenario() -> BareAgent:
        plan = FleetPlan(agents=1, server="http://manager.test", tokens=("t",), bare=True)
        fleet = SimulatedFleet(plan, push_settings)
        agent = BareAgent(fleet, 0, SimIdentity(identity=_identity(delivery)), KEY)
        options = agent.link.options
        expiry = 0 if clean_start else push_settings.mqtt_session_expiry_s
        assert (options.clean_start, options.session_expiry_s, options.will) == (clean_start, expiry, None)
        agent.link = broker.factory(options, lambda message: None)  # type: ignore[assignment]
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await wait_for_async(lambda: agent.push_session, timeout=WAIT_S, what="agent.push_session")
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=10)
            await fleet.stop()
        return agent

    agent = asyncio.run(scenario())
    assert agent.sessions == 1
    assert broker.subscribed_qos == [(cmd_topic(PREFIX, "agent-1"), qos), (config_topic(PREFIX, *KEY), qos)]
