"""The composition root of the manager's app: the api composed with the configured broker engine.

`manager_app` is what `policycast serve` runs in each worker (`local_stack.composition:worker_app`
builds its settings from the environment there), what `policycast up` serves, and what the end-to-end
tests serve. The api alone (`api.main.create_app` without a broker) enrols agents for pull only.
"""

from __future__ import annotations

from fastapi import FastAPI

from api.main import create_app
from broker_bridge.engine import engine_for
from fabric_core.settings import Settings


def manager_app(settings: Settings, *, run_migrations: bool = True) -> FastAPI:
    """The manager's app, with enrolment handing out the broker engine's credentials."""
    return create_app(settings, run_migrations=run_migrations, broker=engine_for)


def worker_app() -> FastAPI:
    """The app of one `policycast serve` worker (`uvicorn --factory`). The parent has migrated the
    database already, so that workers do not race to do it."""
    return manager_app(Settings(), run_migrations=False)


WORKER_APP = f"{__name__}:{worker_app.__name__}"
