"""Every error answer has one shape: `{"detail": str}`, plus `errors` for request validation.

Also the body check in front of FastAPI (`api.json_body`: a JSON body is what orjson accepts, raw
uploads exempt) and the database safety net (`api.error_responses`: an overflow the models missed is
the client's 422, not a 500).
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import DataError

from api.error_responses import ErrorOut, install_error_handlers

JSON = {"Content-Type": "application/json"}


def _shape(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    ErrorOut.model_validate(body)
    assert isinstance(body["detail"], str) and body["detail"]
    return body


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("GET", "/api/v1/groups", {}, 401),  # no key
        ("GET", "/api/v1/groups/999999", {}, 404),
        ("DELETE", "/api/v1/groups/<root>", {}, 409),
        ("POST", "/api/v1/groups", {"json": {"name": "x", "parent_id": 999999}}, 422),  # a service's 422
        ("POST", "/api/v1/groups", {"json": {"nmae": "x"}}, 422),  # validation
        ("POST", "/api/v1/groups", {"content": b"{", "headers": JSON}, 422),  # not JSON
        ("GET", "/api/v1/agents", {"params": {"limit": 0}}, 422),
        ("GET", "/api/v1/nothing", {}, 404),
        (
            "POST",
            "/api/v1/policies",
            {"json": {"name": "p", "type": "t", "body": {"x": "y" * 2_000_000}}},
            413,
        ),
    ],
)
def test_every_error_has_a_string_detail(client, admin, method, path, kwargs, status):
    headers = {**admin.headers, **kwargs.pop("headers", {})} if status != 401 else {}
    path = path.replace("<root>", str(admin.root()["id"]))
    _shape(client.request(method, path, headers=headers, **kwargs), status)


def test_validation_errors_list_every_refused_value_and_summarise_them(client, admin):
    body = {"nmae": "x", "parent_id": "one", "inherit": "yes", "extra": 1}
    answer = _shape(client.post("/api/v1/groups", json=body, headers=admin.headers), 422)
    locations = [e["loc"] for e in answer["errors"]]
    assert ["body", "name"] in locations and ["body", "nmae"] in locations
    assert ["body", "parent_id"] in locations and ["body", "inherit"] in locations
    assert answer["detail"].startswith("body.") and "more)" in answer["detail"]
    assert all(set(e) == {"loc", "msg", "type"} for e in answer["errors"])  # never the input


def test_a_validation_error_about_a_key_with_a_surrogate_still_encodes():
    from api.error_responses import field_errors, summary

    errors = field_errors(
        [{"type": "extra_forbidden", "loc": ("body", "\ud800"), "msg": "no \udc00", "input": 1}]
    )
    assert errors == [{"loc": ["body", "\\ud800"], "msg": "no \\udc00", "type": "extra_forbidden"}]
    assert summary(errors).encode("utf-8")


@pytest.mark.parametrize("content_type", [None, "application/json", "application/merge-patch+json"])
def test_a_body_orjson_refuses_is_422_whatever_the_json_content_type(client, admin, content_type):
    headers = {**admin.headers, **({"Content-Type": content_type} if content_type else {})}
    answer = _shape(client.post("/api/v1/groups", content=b'{"name": NaN}', headers=headers), 422)
    assert answer["errors"][0]["type"] == "json_invalid"


def test_raw_uploads_are_not_checked_as_json(admin):
    """A blob is any bytes, whatever content type the client sends with it."""
    import hashlib

    data = b'{"not": NaN, "s": "\\ud800"'
    digest = hashlib.sha256(data).hexdigest()
    admin.call("PUT", f"/blobs/{digest}", 201, content=data, headers=JSON)


def _app_raising(error: Exception) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise error

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(
    "error",
    [
        OverflowError("Python int too large to convert to SQLite INTEGER"),
        DataError("UPDATE ...", {}, Exception("integer out of range")),
    ],
    ids=["sqlite", "postgresql"],
)
def test_a_database_overflow_on_input_is_422_not_500(error):
    answer = _shape(_app_raising(error).get("/boom"), 422)
    assert "database" in answer["detail"]


def test_any_other_overflow_is_still_a_500():
    assert _app_raising(OverflowError("date value out of range")).get("/boom").status_code == 500
