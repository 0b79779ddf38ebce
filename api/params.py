"""Path and query parameters of both APIs, bounded to what the database can hold.

Ids are BIGINT/INTEGER columns: an id beyond 2**63 - 1 names nothing, and is refused with 422 before it
reaches SQL (where it would overflow the driver, a 500). Every integer a path or a query carries is one
of these types; a request body's integers are bounded in its model (`api.schemas`, `fabric_core.wire`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from fabric_core.serials import SERIAL_MAX
from fabric_core.wire import INT64_MAX, INT64_MIN

ROW_ID_MAX = SERIAL_MAX
"""The largest id any table holds (signed 64-bit)."""

RowId = Annotated[int, Path(ge=1, le=ROW_ID_MAX, description="a row id")]
Revision = Annotated[int, Path(ge=1, le=ROW_ID_MAX, description="a content revision (1, 2, 3 ...)")]
Offset = Annotated[int, Query(ge=0, le=ROW_ID_MAX)]
Limit = Annotated[int, Query(ge=1, le=1000)]
GroupFilter = Annotated[int | None, Query(ge=1, le=ROW_ID_MAX, description="only this group's")]
ReportedLocation = Annotated[
    int | None,
    Query(ge=INT64_MIN, le=INT64_MAX, description="the location the agent chose; absent or unknown: Default"),
]
