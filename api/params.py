"""Path and query parameters of the admin API, bounded to what the database can hold.

Ids are BIGINT/INTEGER columns: an id beyond 2**63 - 1 names nothing, and is refused with 422 before it
reaches SQL (where it would overflow the driver, a 500).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from fabric_core.serials import SERIAL_MAX

ROW_ID_MAX = SERIAL_MAX
"""The largest id any table holds (signed 64-bit)."""

RowId = Annotated[int, Path(ge=1, le=ROW_ID_MAX, description="a row id")]
Offset = Annotated[int, Query(ge=0, le=ROW_ID_MAX)]
Limit = Annotated[int, Query(ge=1, le=1000)]
