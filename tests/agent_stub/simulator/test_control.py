"""The `--control` protocol's answers, on a fleet that has no agents yet (no manager needed)."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import orjson
import pytest

from agent_stub.simulator.control import emit, handle
from agent_stub.simulator.fleet import SimulatedFleet
from agent_stub.simulator.plan import FleetPlan
from fabric_core.settings import AgentSettings


def _ask(settings: AgentSettings, op: str, **request: Any) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        fleet = SimulatedFleet(FleetPlan(agents=0, server="http://manager.test", tokens=("t",)), settings)
        try:
            return await handle(fleet, op, {"op": op, **request})
        finally:
            await fleet.stop()

    return asyncio.run(main())


def test_an_event_is_one_json_line() -> None:
    out = io.StringIO()
    emit(out, {"event": "ready", "ok": True, "agents": 0})
    assert out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1
    assert orjson.loads(out.getvalue()) == {"event": "ready", "ok": True, "agents": 0}


def test_summary_rates_and_waits_answer(settings: AgentSettings) -> None:
    summary = _ask(settings, "summary")
    assert summary["agents"] == 0 and summary["heartbeats"]["total"] == 0
    assert _ask(settings, "rates", since=0)["heartbeats"] == 0
    converged = _ask(settings, "wait_converged", serials={"3/7": 2}, since=0, timeout_s=0.1)
    assert converged["ok"] and converged["expected_serials"] == {"3/7": 2}
    assert _ask(settings, "wait_sessions", since=0, timeout_s=0.1)["ok"]


def test_an_unknown_op_is_refused(settings: AgentSettings) -> None:
    with pytest.raises(ValueError, match="unknown op 'dance'"):
        _ask(settings, "dance")
