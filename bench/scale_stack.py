"""Benchmark 5's stack: `bench.stack.Stack` on the database of the run's choice (SQLite in the stack's
data directory, or a throw-away PostgreSQL database made for the run and dropped after it), with the
queries the benchmark reads the manager's database with: the documents and serials by topic, the outbox
rows of a change and when the bridge marked them published.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from bench.stack import Stack
from fabric_core.topics import config_topic

WAIT_S = 120.0
"""How long benchmark 5 waits for the bridge or the subscriber."""


def throwaway_database(server_url: str | None) -> contextlib.AbstractContextManager[str | None]:
    """SQLite in the stack's data directory (None), the URL as given (SQLite), or for a PostgreSQL URL
    a database of its own on that server, made for this run and dropped after it."""
    if server_url is None or make_url(server_url).get_backend_name() != "postgresql":
        return contextlib.nullcontext(server_url)
    return _postgres_database(server_url)


@contextlib.contextmanager
def _postgres_database(server_url: str) -> Iterator[str]:
    import psycopg

    url = make_url(server_url)
    admin_dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"policycast_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class ScaleStack(Stack):
    """`bench.stack.Stack` on a database of the caller's choice, with the queries this benchmark needs."""

    def __init__(self, data_dir: Path, database_url: str | None = None, *, tls: bool = True) -> None:
        super().__init__(data_dir, tls=tls)
        if database_url:
            self.settings = self.settings.model_copy(update={"database_url": database_url})

    def __enter__(self) -> ScaleStack:
        super().__enter__()
        return self

    def current_documents_by_topic(self) -> dict[str, bytes]:
        """The current envelope of every (group, location), by topic, in serial order."""
        prefix = self.settings.mqtt_prefix
        rows = self.query("SELECT group_id, location_id, envelope FROM effective_configs ORDER BY serial")
        return {config_topic(prefix, g, loc): bytes(envelope) for g, loc, envelope in rows}

    def current_serials_by_topic(self) -> dict[str, int]:
        prefix = self.settings.mqtt_prefix
        rows = self.query("SELECT group_id, location_id, serial FROM effective_configs")
        return {config_topic(prefix, g, loc): int(serial) for g, loc, serial in rows}

    def last_outbox_id(self) -> int:
        return int(self.query("SELECT coalesce(max(id), 0) FROM outbox")[0][0])

    def outbox_since(self, after_id: int) -> list[tuple[int, int, int, datetime | None]]:
        """(group_id, location_id, serial, published_at) of the outbox rows after `after_id`."""
        rows = self.query(
            "SELECT group_id, location_id, serial, published_at FROM outbox WHERE id > :after ORDER BY id",
            after=after_id,
        )
        return [(int(g), int(loc), int(s), _aware(p)) for g, loc, s, p in rows]

    def wait_outbox_published(self, after_id: int, *, timeout: float = WAIT_S) -> list[Any]:
        """Poll until every outbox row after `after_id` is marked published; return the rows."""
        deadline = time.monotonic() + timeout
        while True:
            pending = self.query(
                "SELECT count(*) FROM outbox WHERE id > :after AND published_at IS NULL", after=after_id
            )[0][0]
            if not pending:
                return self.outbox_since(after_id)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pending} outbox row(s) still unpublished after {timeout:.0f}s")
            time.sleep(0.05)


def _aware(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite through a raw text() query
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
