"""The heartbeat hands out renewed broker credentials (`mqtt`) when the broker engine says so, on both
doors (the fast path and the route answer alike), and only to heartbeats that report an expiry.

The engine is a fake `BrokerAccess` that records what it was asked and answers as it is told.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.heartbeat import fast_path
from api.main import create_app
from fabric_core.settings import Settings
from fabric_core.signing import SigningKey
from fabric_core.wire import HeartbeatResponse, MqttCredentials, MqttDelivery, heartbeat_response_bytes
from tests.support.clients import Admin, AgentClient

EXPIRES = 4_102_444_800  # 2100-01-01
JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.secret-part.sig"


class FakeBroker:
    """Answers `refreshed_credentials` with `renew` (None: nothing due); `fail` makes it raise."""

    access_in_credentials = True

    def __init__(self) -> None:
        self.asked: list[tuple[str, int, int | None, bool]] = []
        self.renew: MqttCredentials | None = None
        self.fail = False

    def enrolment_credentials(self, agent_id: str, group_id: int) -> MqttCredentials:
        return self._credentials("enrolment-jwt")

    def refreshed_credentials(
        self, agent_id: str, group_id: int, *, expires_at: int | None, document_changed: bool
    ) -> MqttCredentials | None:
        self.asked.append((agent_id, group_id, expires_at, document_changed))
        if self.fail:
            raise RuntimeError("minting failed")
        return self.renew

    @staticmethod
    def _credentials(password: str) -> MqttCredentials:
        urls = ["mqtts://n1.test:8883", "mqtts://n2.test:8883"]
        return MqttCredentials(
            url=urls[0],
            urls=urls,
            username="agent",
            password=password,
            delivery=MqttDelivery(qos=0, persistent_session=False, protocol="3.1.1"),
            expires_at=datetime(2100, 1, 2, tzinfo=UTC),
        )


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
def client(settings: Settings, broker: FakeBroker) -> Iterator[TestClient]:
    def factory(settings: Settings, key: SigningKey) -> FakeBroker:
        return broker

    with TestClient(create_app(settings.model_copy(update={"mqtt_enabled": True}), broker=factory)) as c:
        yield c


@pytest.fixture
def agent(client: TestClient) -> AgentClient:
    return Admin(client).enroll()


def _both_doors(agent: AgentClient, body: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The answer of the fast path, then the route's (the fast path switched off), to the same body."""
    answers = [agent.heartbeat(body)]
    with monkeypatch.context() as patch:
        patch.setattr(fast_path, "FAST_BODY_LIMIT", 0)
        answers.append(agent.heartbeat(body))
    return answers


def test_renewed_credentials_come_back_on_both_doors(
    agent: AgentClient,
    broker: FakeBroker,
    monkeypatch: pytest.MonkeyPatch,
    answered_fast: list[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    serial = agent.heartbeat(serial=0)["serial"]
    broker.renew = FakeBroker._credentials(JWT)
    body = {"serial": serial, "mode": "push", "mqtt_expires_at": EXPIRES}
    with caplog.at_level(logging.DEBUG):
        fast, routed = _both_doors(agent, body, monkeypatch)
    assert [json.loads(b) for b in answered_fast] == [body]  # the first went the fast way, the second not
    for answer in (fast, routed):
        assert answer["changed"] is False and "config" not in answer
        parsed = HeartbeatResponse.model_validate(answer)
        assert parsed.mqtt == broker.renew
    assert broker.asked == [(agent.id, agent.group_id, EXPIRES, False)] * 2
    assert JWT not in caplog.text


def test_a_new_document_and_credentials_come_together(
    agent: AgentClient, broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker.renew = FakeBroker._credentials(JWT)
    fast, routed = _both_doors(agent, {"serial": 0, "mode": "pull", "mqtt_expires_at": EXPIRES}, monkeypatch)
    for answer in (fast, routed):
        assert answer["changed"] is True and answer["config"]["doc"]["serial"] == answer["serial"]
        assert answer["mqtt"]["password"] == JWT
    assert [asked[3] for asked in broker.asked] == [True, True]  # document_changed: a group move's too


def test_nothing_due_and_no_expiry_reported_answer_as_before(
    agent: AgentClient, broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    serial = agent.heartbeat(serial=0)["serial"]
    assert broker.asked == []  # no expiry reported: the engine is not even asked
    for answer in _both_doors(agent, {"serial": serial, "mode": "push", "mqtt_expires_at": 0}, monkeypatch):
        assert "mqtt" not in answer
    assert [asked[2] for asked in broker.asked] == [0, 0]
    broker.renew = FakeBroker._credentials(JWT)
    for answer in _both_doors(agent, {"serial": serial, "mode": "push"}, monkeypatch):
        assert "mqtt" not in answer  # Mosquitto agents, pull agents: no expiry, no credentials
    assert len(broker.asked) == 2


def test_an_engine_that_fails_does_not_fail_the_heartbeat(
    agent: AgentClient, broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    serial = agent.heartbeat(serial=0)["serial"]
    broker.fail = True
    for answer in _both_doors(agent, {"serial": serial, "mode": "push", "mqtt_expires_at": 1}, monkeypatch):
        assert answer["changed"] is False and "mqtt" not in answer


@pytest.mark.parametrize("expires", [-1, 2**40 + 1, "1700000000", 1.5, True])
def test_a_bad_expiry_goes_to_the_route_and_is_refused(
    agent: AgentClient, broker: FakeBroker, answered_fast: list[bytes], expires: Any
) -> None:
    agent.heartbeat({"serial": 0, "mode": "push", "mqtt_expires_at": expires}, expect=422)
    assert answered_fast == [] and broker.asked == []


def test_response_bytes_splice_the_credentials_in() -> None:
    mqtt = FakeBroker._credentials(JWT).model_dump_json().encode()
    for envelope in (None, b'{"doc":{},"sig":"s","kid":"k"}'):
        raw = heartbeat_response_bytes(
            changed=True, serial=3, next_heartbeat_s=60, envelope=envelope, mqtt=mqtt
        )
        parsed = HeartbeatResponse.model_validate_json(raw)
        assert parsed.mqtt is not None and parsed.mqtt.password == JWT
        assert (parsed.config is None) == (envelope is None)
    plain = heartbeat_response_bytes(changed=False, serial=3, next_heartbeat_s=60, envelope=None)
    assert plain == b'{"changed":false,"serial":3,"next_heartbeat_s":60}'
