"""The heartbeats benchmark 2 sends and the answers it expects.

`prepare_agents` enrols agents in a manager's root group and makes each one's unchanged heartbeat (the
agent's real secret, the serial it holds, its location, a status like the reference agent's) as the
bytes of one HTTP/1.1 request; `HeartbeatAnswer` and `BaselineAnswer` are what a right answer is, from
the manager and from the baselines (`bench.baseline_app`) respectively.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from bench.servers import ADMIN_KEY, Server, wait_healthy

HEARTBEAT_PATH = "/agent/v1/heartbeat"
AGENT_HEARTBEAT_S = 300  # "agents per core at a 5-minute heartbeat"


@dataclass(frozen=True)
class EnrolledAgents:
    """Agents enrolled in the root group, all at one location and serial, and their heartbeats."""

    serial: int
    location_id: int
    requests: list[bytes]  # one unchanged heartbeat per agent
    bodies: list[bytes] = field(repr=False)


def http_request(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """The bytes of one HTTP/1.1 request (keep-alive is HTTP/1.1's default)."""
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def agent_status(index: int) -> dict[str, str]:
    """The status the reference agent sends (`agent_stub.pull`): its hostname and version."""
    return {"hostname": f"bench-host-{index:05d}", "agent_version": "0.1.0"}


def heartbeat_body(serial: int, location_id: int | None, index: int) -> bytes:
    body = {"serial": serial, "location_id": location_id, "mode": "pull", "status": agent_status(index)}
    return orjson.dumps(body)


def request_headers(port: int, secret: str) -> dict[str, str]:
    return {
        "Host": f"127.0.0.1:{port}",
        "User-Agent": "policycast-agent/0.1.0",
        "Accept": "application/json",
        "Authorization": f"Bearer {secret}",
        "Content-Type": "application/json",
    }


async def enroll_agents(server: Server, agents: int, *, concurrency: int = 8) -> list[dict[str, Any]]:
    """Enrol `agents` agents in the root group; return their enrolments."""
    admin_headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=server.url, timeout=60, verify=server.ssl_context or True) as http:
        groups = (await http.get("/api/v1/groups", headers=admin_headers)).raise_for_status().json()
        root = next(g for g in groups if g["parent_id"] is None)["id"]
        token_response = await http.post(
            f"/api/v1/groups/{root}/enrollment-tokens", json={}, headers=admin_headers
        )
        token = token_response.raise_for_status().json()["token"]
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> dict[str, Any]:
            async with gate:
                body = {"token": token, "hostname": f"bench-host-{index:05d}", "facts": {}}
                response = await http.post("/agent/v1/enroll", json=body)
                return dict(response.raise_for_status().json())

        return list(await asyncio.gather(*(one(i) for i in range(agents))))


async def first_heartbeat(server: Server, secret: str) -> tuple[int, int]:
    """The agent's first heartbeat (serial 0): the current serial and the location it is at."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30, verify=server.ssl_context or True) as http:
        response = await http.post(
            HEARTBEAT_PATH,
            content=heartbeat_body(0, None, 0),
            headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        )
        reply = response.raise_for_status().json()
    assert reply["changed"] is True, reply
    return int(reply["serial"]), int(reply["config"]["doc"]["location_id"])


async def prepare_agents(server: Server, agents: int) -> EnrolledAgents:
    """Enrol `agents` agents through `server` and make each one's unchanged heartbeat request."""
    await wait_healthy(server)
    enrolments = await enroll_agents(server, agents)
    serial, location_id = await first_heartbeat(server, enrolments[0]["secret"])
    bodies = [heartbeat_body(serial, location_id, i) for i in range(agents)]
    requests = [
        http_request("POST", HEARTBEAT_PATH, body, request_headers(server.port, e["secret"]))
        for body, e in zip(bodies, enrolments, strict=True)
    ]
    return EnrolledAgents(serial=serial, location_id=location_id, requests=requests, bodies=bodies)


@dataclass(frozen=True)
class HeartbeatAnswer:
    """200 and exactly `{"changed":false,"serial":<current>,"next_heartbeat_s":<interval ± 50 %>}`."""

    serial: int
    heartbeat_s: int = AGENT_HEARTBEAT_S

    def __call__(self, status: int, body: bytes) -> bool:
        if status != 200:
            return False
        reply = orjson.loads(body)
        return (
            len(reply) == 3
            and reply["changed"] is False
            and reply["serial"] == self.serial
            and self.heartbeat_s // 2 <= reply["next_heartbeat_s"] <= self.heartbeat_s * 2
        )


@dataclass(frozen=True)
class BaselineAnswer:
    """200 and `{"changed": false, "serial": <serial>, "next_heartbeat_s": 300}`."""

    serial: int

    def __call__(self, status: int, body: bytes) -> bool:
        expected = {"changed": False, "serial": self.serial, "next_heartbeat_s": 300}
        return status == 200 and orjson.loads(body) == expected


def heartbeat_validator(serial: int, heartbeat_s: int = AGENT_HEARTBEAT_S) -> HeartbeatAnswer:
    return HeartbeatAnswer(serial, heartbeat_s)


def baseline_validator(serial: int) -> BaselineAnswer:
    return BaselineAnswer(serial)
