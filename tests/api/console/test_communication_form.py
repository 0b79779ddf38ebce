"""The Communications Settings dialog's fields ↔ the settings the services take (pure logic)."""

from __future__ import annotations

from api.console import communication_form as form


def test_stored_settings_show_in_the_largest_whole_unit() -> None:
    shown = form.shown({"mode": "pull", "heartbeat_s": 7200, "download_enabled": False, "randomize_s": 0})
    assert (shown.heartbeat_value, shown.heartbeat_unit, shown.mode) == ("2", "hours", "pull")
    assert shown.download_enabled is False and shown.randomize_enabled is False
    assert shown.units == ["minutes", "hours"]
    assert form.shown({"mode": "push", "heartbeat_s": 300, "download_enabled": True, "randomize_s": 90}) == (
        form.DialogValues(True, "push", "5", "minutes", True, "2")
    )


def test_a_heartbeat_that_is_not_whole_minutes_is_offered_in_seconds_so_ok_keeps_it() -> None:
    shown = form.shown({"mode": "push", "heartbeat_s": 90, "download_enabled": True, "randomize_s": 0})
    assert (shown.heartbeat_value, shown.heartbeat_unit) == ("90", "seconds")
    assert "seconds" in shown.units
    settings, _ = form.read({"mode": "push", "heartbeat_value": "90", "heartbeat_unit": "seconds"})
    assert settings is not None and settings["heartbeat_s"] == 90


def test_the_fields_become_seconds_and_booleans() -> None:
    settings, values = form.read(
        {
            "download_enabled": "on",
            "mode": "push",
            "heartbeat_value": "2",
            "heartbeat_unit": "hours",
            "randomize_enabled": "on",
            "randomize_minutes": "15",
        }
    )
    assert settings == {"download_enabled": True, "mode": "push", "heartbeat_s": 7200, "randomize_s": 900}
    assert values.errors == {}


def test_an_unchecked_box_is_absent_from_the_form_and_means_off() -> None:
    settings, _ = form.read({"mode": "pull", "heartbeat_value": "30", "heartbeat_unit": "minutes"})
    assert settings == {"download_enabled": False, "mode": "pull", "heartbeat_s": 1800, "randomize_s": 0}


def test_refused_fields_come_back_with_their_errors_and_what_was_typed() -> None:
    cases = {
        "heartbeat_value": [
            ("0", "minutes"),
            ("25", "hours"),
            ("abc", "minutes"),
            ("", "minutes"),
            ("1e3", "hours"),
        ],
    }
    for value, unit in cases["heartbeat_value"]:
        settings, values = form.read({"mode": "push", "heartbeat_value": value, "heartbeat_unit": unit})
        assert settings is None, (value, unit)
        assert "heartbeat_value" in values.errors and values.heartbeat_value == value
    settings, values = form.read({"mode": "both", "heartbeat_value": "5", "heartbeat_unit": "minutes"})
    assert settings is None and values.errors.keys() == {"mode"}
    settings, values = form.read(
        {"mode": "push", "heartbeat_value": "5", "heartbeat_unit": "minutes", "randomize_enabled": "on"}
    )
    assert settings is None and values.errors.keys() == {"randomize_minutes"}


def test_an_unknown_unit_is_read_as_minutes_not_trusted() -> None:
    settings, values = form.read({"mode": "push", "heartbeat_value": "5", "heartbeat_unit": "fortnights"})
    assert settings is not None and settings["heartbeat_s"] == 300 and values.heartbeat_unit == "minutes"
