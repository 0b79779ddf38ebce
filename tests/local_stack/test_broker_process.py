"""A broker run from its engine's files: it says why when it cannot start, and it stops, starts and
restarts on the same port."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker_bridge.errors import BrokerUnavailable
from local_stack.broker_process import BrokerProcess
from tests.support.broker import Broker


def test_a_broker_that_cannot_start_says_why(mosquitto: Broker, tmp_path: Path) -> None:
    # A second broker on the same port: it exits, and the error shows its log.
    launch = mosquitto.engine.write_config(
        tmp_path / "second", bind="127.0.0.1", tls=None, plain_port=mosquitto.port
    )
    with pytest.raises(BrokerUnavailable, match="Address already in use"):
        BrokerProcess(launch).start()


def test_stop_start_restart(mosquitto: Broker) -> None:
    first = mosquitto.process.pid
    assert mosquitto.process.running and first
    mosquitto.restart()
    assert mosquitto.process.running and mosquitto.process.pid != first
    mosquitto.stop()
    assert not mosquitto.process.running and mosquitto.process.pid is None
