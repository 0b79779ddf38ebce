"""A bounded schemathesis run against both APIs, in-process: no 5xx, every answer as documented.

Schemathesis reads the manager's own OpenAPI document and generates requests for every operation, both
valid ones and ones that break the schema (wrong types, values out of range, missing fields), with a
fixed seed (`derandomize`) and a bounded number of examples, so the run is the same every time and
takes about a minute on a 2-core machine. It runs on SQLite only: what it checks is the API's contract
(statuses, schemas), which the backend does not change; the backends' own refusals are pinned by the
other tests of this package on both. Each answer must:

- not be a 5xx (`not_a_server_error`);
- have a status the operation documents (`status_code_conformance`);
- match the documented schema and content type for that status (`response_schema_conformance`,
  `content_type_conformance`).

It runs with real credentials, so it reaches past authentication: the bootstrap admin key for
`/api/v1`, the secret of an enrolled agent for `/agent/v1`. The operations that retire or revoke API
keys are left out: the run would lock itself out after its first example (their refusals are tested in
tests/api/test_api_keys.py).

The app runs in the `shared_client` fixture (its lifespan: database, view, ledger), one for the whole
run; schemathesis calls it through its own ASGI transport, wrapped so that schemathesis does
not start the lifespan a second time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.types import ASGIApp, Receive, Scope, Send

from api.main import create_app
from fabric_core.settings import Settings
from tests.support.clients import ADMIN_KEY, Admin

pytestmark = [pytest.mark.fuzz, pytest.mark.parametrize("shared_client", ["sqlite"], indirect=True)]

EXAMPLES = 20
"""Examples per operation: the whole run takes about a minute here."""
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance]


class WithoutLifespan:
    """The app for schemathesis' transport: requests go through, the lifespan is the fixture's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


@pytest.fixture(scope="module")
def credentials(shared_client: TestClient) -> dict[str, dict[str, str]]:
    agent = Admin(shared_client).enroll(hostname="fuzzed")
    agent.heartbeat(serial=0)  # cached in the view: the fast path answers its everyday heartbeats
    return {"/api/v1": {"Authorization": f"Bearer {ADMIN_KEY}"}, "/agent/v1": agent.headers}


def _document() -> dict[str, Any]:
    """The manager's OpenAPI document (made without a database: nothing reads one to build it)."""
    with tempfile.TemporaryDirectory() as data_dir:
        return create_app(Settings(data_dir=Path(data_dir))).openapi()


schema = schemathesis.openapi.from_dict(_document()).exclude(path_regex=r"^/api/v1/api-keys", method="DELETE")


@pytest.fixture(scope="module")
def manager(shared_client: TestClient) -> WithoutLifespan:
    """One manager for the whole run (a manager per operation would cost more than the examples):
    what one operation's examples change, the next one's start from."""
    return WithoutLifespan(shared_client.app)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_the_apis_answer_as_documented(
    case: Any, manager: WithoutLifespan, credentials: dict[str, dict[str, str]]
) -> None:
    prefix = "/api/v1" if case.path.startswith("/api/v1") else "/agent/v1"
    case.call_and_validate(app=manager, headers=credentials[prefix], checks=CHECKS)
