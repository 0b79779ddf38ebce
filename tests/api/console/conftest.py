"""The console's tests: the suite's `client` (and so `admin` and `enroll`) on HTTPS, because the console's
session cookie is Secure and a client on http:// would never send it back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from fabric_core.settings import Settings

BASE_URL = "https://testserver"


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), base_url=BASE_URL) as test_client:
        yield test_client
