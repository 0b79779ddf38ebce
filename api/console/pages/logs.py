"""**Logs**: what agents uploaded with their heartbeats, newest first, filtered by group, client (agent
id or host name), level, category and time, a page at a time (Previous / Next)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, get_args
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.console.deps import OperatorDep
from api.console.forms import Fields, pretty_json
from api.console.rendering import render
from api.deps import SessionDep
from api.params import ROW_ID_MAX
from api.services import groups, logs
from fabric_core.wire import LogLevel
from manager_db.models import as_utc

router = APIRouter(prefix="/console/logs")
LEVELS: tuple[str, ...] = get_args(LogLevel)
PAGE_SIZES = (25, 50, 100, 200)
DEFAULT_PAGE = 50
FILTERS = ("group", "client", "level", "category", "since", "until", "limit")
"""The query's fields that the Previous and Next links carry on (with their own offset)."""


@dataclass(frozen=True)
class LogRow:
    ts: datetime | None
    agent_id: str
    host: str
    level: str
    category: str
    message: str
    data: str | None
    """The entry's data as indented JSON, shown collapsed; None when it has none."""


@dataclass(frozen=True)
class Query:
    group_id: int | None
    client: str | None
    level: str | None
    category: str | None
    since: datetime | None
    until: datetime | None
    limit: int
    offset: int


def read_query(fields: Fields) -> Query:
    """The filters, each checked at its field: a refused one shows the reason there and no logs."""
    group_id = fields.integer("group", low=1, high=ROW_ID_MAX, what="Group")
    client = fields.text("client", max_length=255).strip() or None
    level = fields.text("level", max_length=16).strip() or None
    if level is not None and level not in LEVELS:
        fields.refuse("level", f"Level must be one of {', '.join(LEVELS)}")
    category = fields.text("category", max_length=64).strip() or None
    since = fields.moment("since", what="Since")
    until = fields.moment("until", what="Until")
    if since is not None and until is not None and until <= since:
        fields.refuse("until", "Until must be later than Since")
    limit = fields.integer("limit", low=1, high=max(PAGE_SIZES), what="Entries per page")
    offset = fields.integer("offset", low=0, high=ROW_ID_MAX, what="Offset")
    return Query(group_id, client, level, category, since, until, limit or DEFAULT_PAGE, offset or 0)


def _link(values: dict[str, str], offset: int) -> str:
    kept = {name: values[name] for name in FILTERS if values.get(name)}
    return "/console/logs?" + urlencode({**kept, "offset": offset})


@router.get("", include_in_schema=False)
def logs_page(request: Request, operator: OperatorDep, session: SessionDep) -> Response:
    fields = Fields(request.query_params)
    query = read_query(fields)
    rows: list[LogRow] = []
    more = False
    if fields.ok:
        found = logs.query_logs(
            session,
            group_id=query.group_id,
            client=query.client,
            level=query.level,
            category=query.category,
            since=query.since,
            until=query.until,
            limit=query.limit + 1,  # one more than shown: is there a next page?
            offset=query.offset,
        )
        more = len(found) > query.limit
        found = found[: query.limit]
        hosts = logs.hostnames(session, agent_ids={record.agent_id for record in found})
        rows = [
            LogRow(
                ts=as_utc(record.ts),
                agent_id=record.agent_id,
                host=hosts.get(record.agent_id, record.agent_id),
                level=record.level,
                category=record.category,
                message=record.message,
                data=None if record.data is None else pretty_json(record.data),
            )
            for record in found
        ]
    context: dict[str, Any] = {
        "operator": operator,
        "section": "logs",
        "groups": sorted(groups.list_groups(session), key=lambda group: group.name.casefold()),
        "levels": LEVELS,
        "page_sizes": PAGE_SIZES,
        "values": {**fields.values, "limit": str(query.limit)},
        "errors": fields.errors,
        "rows": rows,
        "first": query.offset + 1,
        "previous": _link(fields.values, max(query.offset - query.limit, 0)) if query.offset > 0 else None,
        "next": _link(fields.values, query.offset + query.limit) if more else None,
    }
    return render(request, "logs.html", context, status_code=200 if fields.ok else 422)
