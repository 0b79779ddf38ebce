"""Errors the manager's services raise; the app turns each into an HTTP status with `{"detail": ...}`.

    ServiceError
    ├── NotFound        404  the id names nothing
    ├── Conflict        409  the request clashes with the current state (cycle, in use, inherits, ...)
    ├── Invalid         422  the request is well-formed but not acceptable (wrong policy type, ...)
    ├── Unauthorized    401  no credentials, unknown ones, expired token
    ├── Forbidden       403  credentials that may not do this (a viewer, a revoked agent)
    ├── PayloadTooLarge 413  a body or a log batch over the configured limit
    └── ServiceUnavailable  503  not ready yet (a document another process made an instant ago)

A service raises before it commits, so a refused request changes nothing.
"""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class Invalid(ServiceError):
    status_code = 422


class Unauthorized(ServiceError):
    status_code = 401


class Forbidden(ServiceError):
    status_code = 403


class PayloadTooLarge(ServiceError):
    status_code = 413


class ServiceUnavailable(ServiceError):
    status_code = 503
