"""ASGI entry point for `uvicorn --factory api.asgi:create` and for each worker of `policycast serve`.

Each worker process is its own entry point, so it builds its settings from the environment here. The
parent (`policycast serve`) has already migrated the database, so workers do not race to do it.
"""

from __future__ import annotations

from fastapi import FastAPI

from api.main import create_app
from fabric_core.settings import Settings


def create() -> FastAPI:
    return create_app(Settings(), run_migrations=False)
