"""`MosquittoEngine`: Mosquitto 2 with its dynamic-security plugin, the first broker engine.

Each agent gets a dynamic-security client (username = agent id) with two roles: its group's (read the
group's config topics) and its own (read its cmd topic, write its state topic). The bridge provisions
them from the agents table (`reconcile`); passwords are derived from the signing key
(`fabric_core.broker_credentials`), so the api hands out the same password at enrolment without
writing to the broker. Delivery is QoS 1 on a persistent session: the broker queues what an agent
misses while it is away.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from broker_bridge.broker import BrokerLink
from broker_bridge.engine import BrokerEngine, BrokerLaunch, TlsListener
from broker_bridge.mosquitto import accounts, bulk
from broker_bridge.mosquitto.config import BrokerLayout, write_broker_files
from broker_bridge.mosquitto.install import find_dynsec_plugin, mosquitto_binary
from fabric_core.broker_credentials import agent_password, bridge_password
from fabric_core.wire import MqttCredentials, MqttDelivery

READY_MARKER = b" running"
"""Mosquitto logs "mosquitto version ... running" once every listener is bound."""


class MosquittoEngine(BrokerEngine):
    name: ClassVar[str] = "mosquitto"
    delivery: ClassVar[MqttDelivery] = MqttDelivery(qos=1, persistent_session=True)

    def write_config(
        self,
        directory: Path,
        *,
        bind: str,
        tls: TlsListener | None,
        plain_port: int | None = None,
        run_as: str | None = None,
    ) -> BrokerLaunch:
        layout = BrokerLayout(directory)
        username, password = self.bridge_credentials()
        write_broker_files(
            layout=layout,
            bind=bind,
            plain_port=plain_port,
            bridge_username=username,
            bridge_password=password,
            prefix=self.settings.mqtt_prefix,
            plugin_path=find_dynsec_plugin(self.settings.mosquitto_plugin),
            user=run_as,
            tls=tls,
        )
        port = tls.port if tls is not None else plain_port
        assert port is not None  # write_broker_files refuses a broker without a listener
        host = "127.0.0.1" if bind in ("0.0.0.0", "") else "::1" if bind == "::" else bind
        return BrokerLaunch(
            argv=(mosquitto_binary(), "-c", str(layout.config_path)),
            log_path=layout.log_path,
            ready_marker=READY_MARKER,
            host=host,
            port=port,
        )

    def write_agents(self, directory: Path, agents: Iterable[tuple[str, int]]) -> int:
        """Write these (agent id, group id) accounts, with their derived passwords, straight into the
        dynamic-security file of the stopped broker configured in `directory` (`write_config` first):
        O(N) where the control API is O(N^2) on 2.0.11 (`bulk`). Returns how many."""
        key = self.signing_key
        return bulk.write_agent_accounts(
            BrokerLayout(directory),
            prefix=self.settings.mqtt_prefix,
            agents=((agent_id, group_id, agent_password(key, agent_id)) for agent_id, group_id in agents),
        )

    def check_installed(self) -> None:
        mosquitto_binary()
        find_dynsec_plugin(self.settings.mosquitto_plugin)

    def bridge_credentials(self) -> tuple[str, str]:
        return self.settings.mqtt_username, bridge_password(self.settings, self._signing_key)

    def enrolment_credentials(self, agent_id: str, group_id: int) -> MqttCredentials:
        url = self.settings.mqtt_public_address.url
        return MqttCredentials(
            url=url,
            urls=[url],
            username=agent_id,
            password=agent_password(self.signing_key, agent_id),
            prefix=self.settings.mqtt_prefix,
            delivery=self.delivery,
        )

    def provision(self, link: BrokerLink, *, agent_id: str, group_id: int) -> None:
        accounts.provision_agent(
            link,
            prefix=self.settings.mqtt_prefix,
            agent_id=agent_id,
            group_id=group_id,
            password=agent_password(self.signing_key, agent_id),
        )

    def move(self, link: BrokerLink, *, agent_id: str, old_group_id: int, new_group_id: int) -> None:
        accounts.move_agent(
            link,
            prefix=self.settings.mqtt_prefix,
            agent_id=agent_id,
            old_group_id=old_group_id,
            new_group_id=new_group_id,
        )

    def remove(self, link: BrokerLink, *, agent_id: str) -> None:
        accounts.remove_agent(link, prefix=self.settings.mqtt_prefix, agent_id=agent_id)
