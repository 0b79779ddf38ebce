"""**Audit**: who changed what and when (one row per change, written in the change's own transaction),
newest first, filtered by actor and action, a page at a time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.console.deps import OperatorDep
from api.console.forms import Fields, pretty_json
from api.console.rendering import render
from api.deps import SessionDep
from api.params import ROW_ID_MAX
from api.services import audit
from manager_db.models import as_utc

router = APIRouter(prefix="/console/audit")
PAGE_SIZES = (25, 50, 100, 200)
DEFAULT_PAGE = 50
SHORT_DETAIL = 100
"""A detail longer than this (in compact JSON) is shown collapsed."""


@dataclass(frozen=True)
class AuditRow:
    at: datetime | None
    actor: str
    action: str
    target: str
    detail: str
    """Compact JSON, one line."""
    detail_full: str | None
    """Indented JSON, shown collapsed, for a detail too long for one line."""


def _row(at: datetime | None, actor: str, action: str, target: str, detail: dict[str, Any]) -> AuditRow:
    compact = json.dumps(detail, ensure_ascii=False, separators=(", ", ": "))
    long = len(compact) > SHORT_DETAIL
    shown = compact[:SHORT_DETAIL] + "…" if long else compact
    return AuditRow(as_utc(at), actor, action, target, shown, pretty_json(detail) if long else None)


def _link(values: dict[str, str], offset: int) -> str:
    kept = {name: values[name] for name in ("actor", "action", "limit") if values.get(name)}
    return "/console/audit?" + urlencode({**kept, "offset": offset})


@router.get("", include_in_schema=False)
def audit_page(request: Request, operator: OperatorDep, session: SessionDep) -> Response:
    fields = Fields(request.query_params)
    actor = fields.text("actor", max_length=128).strip() or None
    action = fields.text("action", max_length=64).strip() or None
    limit = fields.integer("limit", low=1, high=max(PAGE_SIZES), what="Entries per page") or DEFAULT_PAGE
    offset = fields.integer("offset", low=0, high=ROW_ID_MAX, what="Offset") or 0
    rows: list[AuditRow] = []
    more = False
    if fields.ok:
        found = audit.list_audit(session, actor=actor, action=action, limit=limit + 1, offset=offset)
        more = len(found) > limit
        rows = [_row(e.at, e.actor, e.action, e.target, e.detail) for e in found[:limit]]
    context = {
        "operator": operator,
        "section": "audit",
        "actors": audit.actors(session),
        "actions": audit.actions(session),
        "page_sizes": PAGE_SIZES,
        "values": {**fields.values, "limit": str(limit)},
        "errors": fields.errors,
        "rows": rows,
        "first": offset + 1,
        "previous": _link(fields.values, max(offset - limit, 0)) if offset > 0 else None,
        "next": _link(fields.values, offset + limit) if more else None,
    }
    return render(request, "audit.html", context, status_code=200 if fields.ok else 422)
