"""The OpenAPI document as the manager really answers: security schemes and every error status.

FastAPI documents what a route declares. What the layers in front of the routes answer is added here,
once, from the rules they follow:

- both APIs take `Authorization: Bearer`: `/api/v1` an API key (`ApiKey`), `/agent/v1` an agent
  secret (`AgentSecret`), except the open paths (enrolment, whose token is in the body, and the CA
  download). Swagger UI then shows "Authorize";
- a secured operation answers 401 (no, an unknown or revoked credential); 403 for a viewer key on any
  change under `/api/v1`, and for a revoked agent on every secured `/agent/v1` operation;
- an operation with a body answers 413 (`BodyLimit`), and one with parameters or a body 422
  (validation, `JsonBodies`);
- every error answer is `ErrorOut` (`{"detail": str}`, plus `errors` on validation), FastAPI's
  `HTTPValidationError` replaced by it.

What a route's own service can refuse (404, 409, 503 ...) the route declares, with `errors(...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from api.error_responses import ErrorOut, FieldError

ADMIN_PREFIX = "/api/v1"
AGENT_PREFIX = "/agent/v1"
OPEN_PATHS = frozenset({"/agent/v1/enroll", "/agent/v1/ca"})
"""Operations under the prefixes that need no bearer credential: enrolment (its token is in the body) and
the CA an agent fetches before it enrols."""
READ_METHODS = frozenset({"get", "head"})
BODY_METHODS = frozenset({"post", "put", "patch"})

DESCRIPTIONS = {
    304: "not modified: `If-None-Match` matches the current ETag (weak comparison, or `*`)",
    400: "bad request",
    401: "no credential, or an unknown, revoked or expired one",
    403: "a credential that may not do this: a viewer key on a change, a revoked agent",
    404: "an id or a name in the path names nothing",
    409: "the request clashes with the current state",
    413: "the body is larger than the manager accepts",
    416: "the range starts beyond the end of the file",
    422: "the request is malformed or a value is out of range; `errors` lists every refused value",
    503: "not ready yet (a group made through another process an instant ago): retry shortly",
}
ERROR_REF = "#/components/schemas/ErrorOut"
SECURITY_SCHEMES = {
    "ApiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key (`pck_...`, `policycast admin create-key`) or the bootstrap key",
    },
    "AgentSecret": {
        "type": "http",
        "scheme": "bearer",
        "description": "the agent's secret (`pcas_...`), from `POST /agent/v1/enroll`",
    },
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: these error statuses, each answering `ErrorOut`."""
    return {code: {"model": ErrorOut, "description": DESCRIPTIONS[code]} for code in codes}


def not_modified() -> dict[int | str, dict[str, Any]]:
    """`responses=` for a conditional GET: 304, no body."""
    return {304: {"description": DESCRIPTIONS[304]}}


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _scheme(path: str) -> str | None:
    if path in OPEN_PATHS:
        return None
    if _under(path, ADMIN_PREFIX):
        return "ApiKey"
    if _under(path, AGENT_PREFIX):
        return "AgentSecret"
    return None


def _error(code: int) -> dict[str, Any]:
    return {
        "description": DESCRIPTIONS.get(code, "error"),
        "content": {"application/json": {"schema": {"$ref": ERROR_REF}}},
    }


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the security schemes and the layers' error statuses to FastAPI's document, in place."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
    schemas = components.setdefault("schemas", {})
    for model in (ErrorOut, FieldError):
        found = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(found.pop("$defs", {}))
        schemas.setdefault(model.__name__, found)
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            _document_operation(path, method, operation)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return schema


def _document_operation(path: str, method: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    scheme = _scheme(path)
    if scheme is not None:
        operation["security"] = [{scheme: []}]
        responses.setdefault("401", _error(401))
        if scheme == "AgentSecret" or method not in READ_METHODS:
            responses.setdefault("403", _error(403))
    elif _under(path, ADMIN_PREFIX) or _under(path, AGENT_PREFIX):
        operation["security"] = []
    if "requestBody" in operation or method in BODY_METHODS:
        responses.setdefault("413", _error(413))
    if operation.get("parameters") or "requestBody" in operation or method in BODY_METHODS:
        responses["422"] = _error(422)
    for status, response in responses.items():
        if status[:1] in ("4", "5"):
            content = response.setdefault("content", {})
            content["application/json"] = {"schema": {"$ref": ERROR_REF}}
            response.setdefault("description", DESCRIPTIONS.get(int(status), "error"))


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (hence `/openapi.json`, `/docs`) the document `document` completes."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
