"""The broker-engine seam (`broker_bridge.engine`): `engine_for` picks the engine the settings name."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from broker_bridge.engine import BrokerEngine, engine_for
from broker_bridge.mosquitto.engine import MosquittoEngine
from fabric_core.settings import Settings
from fabric_core.signing import SigningKey


def test_engine_for_picks_mosquitto_by_default_and_by_name(tmp_path: Path) -> None:
    key = SigningKey.generate()
    for settings in (Settings(data_dir=tmp_path), Settings(data_dir=tmp_path, broker_engine="mosquitto")):
        engine = engine_for(settings, key)
        assert isinstance(engine, MosquittoEngine) and isinstance(engine, BrokerEngine)
        assert engine.name == "mosquitto"
        assert engine.settings is settings and engine.signing_key is key


def test_an_engine_without_the_signing_key_says_what_it_needs(tmp_path: Path) -> None:
    engine = engine_for(Settings(data_dir=tmp_path), None)  # as `policycast broker-config` may run
    with pytest.raises(ValueError, match="signing key"):
        _ = engine.signing_key


def test_an_unknown_engine_is_refused_with_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLICYCAST_BROKER_ENGINE", "rabbitmq")
    with pytest.raises(ValidationError, match="broker_engine"):
        Settings()
