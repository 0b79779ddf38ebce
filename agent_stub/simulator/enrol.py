"""Enrolment of a fleet: many agents through the manager's Agent API, a few at a time, over one pool.

`enrol` enrols the agents of the given indices with their tokens, `enrol_concurrency` at a time, each
with the host facts of its site, retrying a manager that cannot be reached (5 attempts, 0.5 s doubling),
and shows its progress. Requests go through the fleet's own connection pool (`_KeepOpen`), which trusts
the CA pinned for the fleet (`agent_stub.simulator.pinning`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

import httpx

from agent_stub.errors import ManagerError, ManagerUnreachable, ManagerUntrusted
from agent_stub.manager_client import ManagerClient, normalize_server
from agent_stub.simulator.plan import SITE_FACT, FleetPlan, SimIdentity, site_name
from agent_stub.simulator.stats import Progress
from agent_stub.state import Identity


async def enrol(
    plan: FleetPlan,
    indices: range,
    tokens: list[str],
    *,
    transport: httpx.AsyncBaseTransport,
    timeout_s: float,
    progress: Progress,
    trusted_cas: Sequence[str] = (),
) -> list[SimIdentity]:
    """Enrol the agents `indices` (agent i with tokens[i - indices.start], bare tokens); their
    identities, in order. `transport` trusts `trusted_cas` (pinned once for the fleet), which every
    identity keeps."""
    server = normalize_server(plan.server)
    results: dict[int, SimIdentity] = {}
    limit = asyncio.Semaphore(plan.enrol_concurrency)
    shared = _KeepOpen(transport)
    total = len(indices)

    async def one(index: int, token: str) -> None:
        site = plan.site_of(index)
        hostname = f"{plan.group_prefix}-agent-{index + 1:05d}"
        facts = {"simulated": True, SITE_FACT: site_name(site) if site else None}
        async with limit:
            for attempt in range(5):
                try:
                    response = await ManagerClient.enroll(
                        server=server,
                        token=token,
                        hostname=hostname,
                        facts=facts,
                        timeout_s=timeout_s,
                        transport=shared,
                    )
                    break
                except ManagerError as exc:
                    if attempt == 4 or not _transient(exc):
                        raise
                    await asyncio.sleep(0.5 * 2**attempt)
        identity = Identity.from_enrollment(
            server=server, response=response, hostname=hostname, trusted_cas=trusted_cas
        )
        results[index] = SimIdentity(identity=identity, site=site)
        progress.update("enrolled", len(results), total)

    progress.update("enrolled", 0, total)
    await gather_with_refresh(
        [one(index, token) for index, token in zip(indices, tokens, strict=True)], progress
    )
    return [results[i] for i in indices]


class _KeepOpen(httpx.AsyncBaseTransport):
    """The shared pool's transport, lent to a client that would close it (`ManagerClient.enroll`)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        return None


def _transient(exc: ManagerError) -> bool:
    # A certificate from another CA will not change by waiting.
    return isinstance(exc, ManagerUnreachable) and not isinstance(exc, ManagerUntrusted)


async def gather_with_refresh(work: Sequence[Awaitable[None]], progress: Progress) -> None:
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=0.25, return_when=asyncio.FIRST_EXCEPTION)
            progress.refresh()
            for task in done:
                task.result()  # raises the first failure
    finally:
        for task in tasks:
            task.cancel()
