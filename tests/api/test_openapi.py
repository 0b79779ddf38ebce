"""The OpenAPI document: bearer security schemes, and every status an operation answers, as it answers."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from api.main import create_app
from api.openapi import OPEN_PATHS
from fabric_core.settings import Settings


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as data_dir:
        return create_app(Settings(data_dir=Path(data_dir))).openapi()


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, ops in document["paths"].items() for method, op in ops.items()]


def test_both_apis_declare_a_bearer_scheme(document):
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "http", "scheme": "bearer"}
    assert schemes["AgentSecret"] == {**schemes["AgentSecret"], "type": "http", "scheme": "bearer"}


def test_every_operation_names_its_credential(document):
    for path, method, op in _operations(document):
        if path in OPEN_PATHS:  # enrolment carries its token in the body; the CA comes before it
            assert op["security"] == [], (method, path)
        elif path.startswith("/api/v1"):
            assert op["security"] == [{"ApiKey": []}], (method, path)
        elif path.startswith("/agent/v1"):
            assert op["security"] == [{"AgentSecret": []}], (method, path)


def test_secured_operations_document_401_and_changes_403(document):
    for path, method, op in _operations(document):
        if op.get("security"):
            assert "401" in op["responses"], (method, path)
        if path.startswith("/api/v1") and method not in ("get", "head"):
            assert "403" in op["responses"], (method, path)
        if path.startswith("/agent/v1") and op.get("security"):
            assert "403" in op["responses"], (method, path)


def test_every_error_answer_is_the_one_error_model(document):
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, method, op in _operations(document):
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (method, path, status)


def test_the_error_model_is_documented_as_it_is(document):
    error = document["components"]["schemas"]["ErrorOut"]
    assert error["required"] == ["detail"] and error["properties"]["detail"]["type"] == "string"
    field = document["components"]["schemas"]["FieldError"]
    assert set(field["properties"]) == {"loc", "msg", "type"}


@pytest.mark.parametrize(
    ("method", "path", "statuses"),
    [
        ("post", "/api/v1/groups", {"201", "401", "403", "409", "413", "422"}),
        ("delete", "/api/v1/groups/{group_id}", {"204", "401", "403", "404", "409", "422"}),
        ("get", "/api/v1/groups/{group_id}/locations/{location_id}/effective", {"200", "401", "404", "422"}),
        ("post", "/agent/v1/enroll", {"200", "401", "413", "422"}),
        ("post", "/agent/v1/heartbeat", {"200", "401", "403", "413", "422", "503"}),
        ("get", "/agent/v1/config", {"200", "304", "401", "403", "422", "503"}),
        ("get", "/agent/v1/content/{kind}/{revision}", {"200", "304", "401", "403", "404", "422"}),
        ("get", "/agent/v1/blobs/{sha256}", {"200", "206", "304", "401", "403", "404", "416", "422"}),
        ("put", "/api/v1/blobs/{sha256}", {"201", "401", "403", "413", "422"}),
    ],
)
def test_operations_document_the_statuses_they_answer(document, method, path, statuses):
    assert set(document["paths"][path][method]["responses"]) == statuses


def test_signed_envelopes_are_documented_as_envelopes(document):
    envelope = {"$ref": "#/components/schemas/Envelope"}
    for path in ("/agent/v1/config", "/api/v1/groups/{group_id}/locations/{location_id}/effective"):
        assert (
            document["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
            == envelope
        )


def test_the_blob_upload_takes_raw_bytes(document):
    body = document["paths"]["/api/v1/blobs/{sha256}"]["put"]["requestBody"]
    assert "application/octet-stream" in body["content"]
