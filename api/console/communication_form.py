"""The "Communications Settings" dialog's fields, read into settings or into errors at their fields.

The dialog speaks in the console's units (a heartbeat in minutes or hours, a randomisation window in
minutes, checkboxes that are absent when unchecked); the services speak in `CommunicationColumns`
(seconds and booleans). This module is the one translation between the two, both ways.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fabric_core.wire import HEARTBEAT_MAX_S, HEARTBEAT_MIN_S

Unit = Literal["seconds", "minutes", "hours"]
UNIT_SECONDS: dict[str, int] = {"seconds": 1, "minutes": 60, "hours": 3600}
MAX_NUMBER_CHARS = 12


@dataclass(frozen=True)
class DialogValues:
    """What the dialog shows: the stored settings, or what the operator typed when it was refused."""

    download_enabled: bool
    mode: str
    heartbeat_value: str
    heartbeat_unit: str
    randomize_enabled: bool
    randomize_minutes: str
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def units(self) -> list[str]:
        """Minutes and hours, as SEPM offers; seconds too when the setting is not whole minutes."""
        return ["seconds", "minutes", "hours"] if self.heartbeat_unit == "seconds" else ["minutes", "hours"]


def shown(settings: Mapping[str, Any]) -> DialogValues:
    """The dialog's values for stored settings (`communication_of`)."""
    heartbeat_s = int(settings["heartbeat_s"])
    unit: Unit = "hours" if heartbeat_s % 3600 == 0 else "minutes" if heartbeat_s % 60 == 0 else "seconds"
    randomize_s = int(settings["randomize_s"])
    return DialogValues(
        download_enabled=bool(settings["download_enabled"]),
        mode=str(settings["mode"]),
        heartbeat_value=str(heartbeat_s // UNIT_SECONDS[unit]),
        heartbeat_unit=unit,
        randomize_enabled=randomize_s > 0,
        randomize_minutes=str(max(1, -(-randomize_s // 60))) if randomize_s else "",
    )


def _whole(text: str, what: str) -> int:
    text = text.strip()
    if not text or len(text) > MAX_NUMBER_CHARS or not text.isdigit():
        raise ValueError(f"{what} must be a whole number")
    return int(text)


def read(form: Mapping[str, Any]) -> tuple[dict[str, Any] | None, DialogValues]:
    """(settings for the services, or None when refused; the values to show again with their errors)."""
    text = {
        name: str(form.get(name, ""))
        for name in ("mode", "heartbeat_value", "heartbeat_unit", "randomize_minutes")
    }
    values = DialogValues(
        download_enabled=form.get("download_enabled") == "on",
        mode=text["mode"],
        heartbeat_value=text["heartbeat_value"],
        heartbeat_unit=text["heartbeat_unit"] if text["heartbeat_unit"] in UNIT_SECONDS else "minutes",
        randomize_enabled=form.get("randomize_enabled") == "on",
        randomize_minutes=text["randomize_minutes"],
    )
    errors: dict[str, str] = {}
    if values.mode not in ("push", "pull"):
        errors["mode"] = "Choose Push mode or Pull mode."
    heartbeat_s = 0
    try:
        heartbeat_s = (
            _whole(values.heartbeat_value, "The heartbeat interval") * UNIT_SECONDS[values.heartbeat_unit]
        )
        if not HEARTBEAT_MIN_S * 60 <= heartbeat_s <= HEARTBEAT_MAX_S and values.heartbeat_unit != "seconds":
            raise ValueError("The heartbeat interval must be between 1 minute and 24 hours")
        if not HEARTBEAT_MIN_S <= heartbeat_s <= HEARTBEAT_MAX_S:
            raise ValueError("The heartbeat interval must be between 1 second and 24 hours")
    except ValueError as refused:
        errors["heartbeat_value"] = f"{refused}."
    randomize_s = 0
    if values.randomize_enabled:
        try:
            randomize_s = _whole(values.randomize_minutes, "The randomization window") * 60
            if not 60 <= randomize_s <= HEARTBEAT_MAX_S:
                raise ValueError("The randomization window must be between 1 minute and 24 hours")
        except ValueError as refused:
            errors["randomize_minutes"] = f"{refused}."
    if errors:
        return None, DialogValues(**{**values.__dict__, "errors": errors})
    settings = {
        "download_enabled": values.download_enabled,
        "mode": values.mode,
        "heartbeat_s": heartbeat_s,
        "randomize_s": randomize_s,
    }
    return settings, values
