"""The manager's admin API as the simulator drives it: groups prepared for a plan, and what they hold.

With `--admin-key` the simulator makes the plan's groups (`prepare_groups`, idempotent), a join token
per group (`enrolment_tokens`: the enrolment token and the CA hash to pin), looks up the location each
bare client belongs to (`location_keys`) and the current serial of each (group, location)
(`effective_serial`). Every call raises RuntimeError on an HTTP error, with the method, path, status and
the start of the body.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import httpx
import orjson

from agent_stub.simulator.plan import SITE_FACT, SITE_WEIGHT, DocumentKey, FleetPlan, SimIdentity, site_name


async def prepare_groups(admin: httpx.AsyncClient, plan: FleetPlan) -> list[int]:
    """Make sure the plan's groups exist under the root, own their settings (inheritance off, so that
    each may have its own mode) and have locations `site-1`.. with a condition on the `site` fact.

    Idempotent: a second run finds everything in place and changes nothing (no new serials).
    """
    groups = ok(await admin.get("/groups"))
    root = next(g for g in groups if g["parent_id"] is None)
    by_name = {g["name"]: g for g in groups if g["parent_id"] == root["id"]}
    ids = []
    for index in range(plan.groups):
        name = plan.group_name(index)
        group = by_name.get(name)
        if group is None:
            group = ok(
                await admin.post("/groups", json={"name": name, "parent_id": root["id"], "inherit": False})
            )
        elif group["inherit"]:
            group = ok(await admin.patch(f"/groups/{group['id']}", json={"inherit": False}))
        group_id = int(group["id"])
        ids.append(group_id)
        locations = {loc["name"]: loc for loc in ok(await admin.get(f"/groups/{group_id}/locations"))}
        for site in range(1, plan.locations):
            conditions = [
                {"type": "fact", "name": SITE_FACT, "equals": site_name(site), "weight": SITE_WEIGHT}
            ]
            if site_name(site) not in locations:
                ok(
                    await admin.post(
                        f"/groups/{group_id}/locations",
                        json={"name": site_name(site), "conditions": conditions},
                    )
                )
        communication = ok(await admin.get(f"/groups/{group_id}/communication"))
        wanted: dict[str, Any] = {"mode": plan.mode_of_group(index)}
        if plan.heartbeat_s is not None:
            wanted["heartbeat_s"] = plan.heartbeat_s
        if any(communication.get(k) != v for k, v in wanted.items()):
            ok(await admin.put(f"/groups/{group_id}/communication", json=wanted))
    return ids


def ok(response: httpx.Response) -> Any:
    check(response)
    return response.json() if response.content else None


def check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: HTTP {response.status_code}: "
            f"{response.text[:300]}"
        )


async def enrolment_tokens(admin: httpx.AsyncClient, plan: FleetPlan, indices: range) -> list[str]:
    """A token per agent to enrol (one per group, for as many agents as go there), after the groups are
    prepared: prepared even when no agent is to enrol."""
    group_ids = await prepare_groups(admin, plan)
    if not indices:
        return []
    per_group = Counter(i % len(group_ids) for i in indices)
    by_group: dict[int, str] = {}
    for slot, count in per_group.items():
        response = await admin.post(
            f"/groups/{group_ids[slot]}/enrollment-tokens",
            json={"max_uses": count, "expires_in_s": 86400},
        )
        check(response)
        answer = response.json()
        # The join token carries the CA hash agents pin (a manager serving plain HTTP has none).
        by_group[slot] = answer.get("join_token") or answer["token"]
    return [by_group[i % len(group_ids)] for i in indices]


async def location_keys(admin: httpx.AsyncClient, chosen: Sequence[SimIdentity]) -> list[DocumentKey]:
    """The (group, location) each agent would be in: its group, and the location of its site."""
    by_group: dict[int, dict[str, int]] = {}
    for group_id in sorted({sim.identity.group_id for sim in chosen}):
        locations = ok(await admin.get(f"/groups/{group_id}/locations"))
        names = {loc["name"]: int(loc["id"]) for loc in locations}
        names[""] = next(int(loc["id"]) for loc in locations if loc["is_default"])
        by_group[group_id] = names
    keys = []
    for sim in chosen:
        names = by_group[sim.identity.group_id]
        site = site_name(sim.site) if sim.site else ""
        keys.append((sim.identity.group_id, names.get(site, names[""])))
    return keys


async def effective_serial(admin: httpx.AsyncClient, key: DocumentKey) -> int:
    """The serial of the document the manager holds for (group, location) `key`."""
    group_id, location_id = key
    response = await admin.get(f"/groups/{group_id}/locations/{location_id}/effective")
    check(response)
    return int(orjson.loads(response.content)["doc"]["serial"])
