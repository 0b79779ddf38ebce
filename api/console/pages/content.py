"""**Content**: the revisions of each content kind (e.g. `definitions`) the manager keeps, and each
revision's manifest (paths, sizes, SHA-256). Read-only: a revision is published by uploading its files
over the admin API (`policycast admin publish-content`), which the page says how to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response
from sqlmodel import Session

from api.console.deps import OperatorDep
from api.console.rendering import render
from api.deps import FabricDep, SessionDep
from api.params import Revision
from api.services import content
from manager_db.models import ContentRevision

router = APIRouter(prefix="/console/content")
Kind = Annotated[str, Path(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
"""A content kind, by the admin API's rule (`api.routes.content.Kind`)."""


def size_text(size: int) -> str:
    """1536 → "1.5 KiB": sizes as a person compares them; the manifest keeps the exact bytes."""
    amount = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{size} bytes" if unit == "bytes" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class RevisionRow:
    revision: ContentRevision
    current: bool
    held: bool
    """An agent reported holding it at its last heartbeat (so retention keeps it)."""

    @property
    def files(self) -> int:
        return len(self.revision.manifest)

    @property
    def total_size(self) -> str:
        return size_text(sum(int(entry.get("size", 0)) for entry in self.revision.manifest))


def _kinds(session: Session) -> dict[str, list[RevisionRow]]:
    current = content.current_revisions(session)
    shown: dict[str, list[RevisionRow]] = {}
    for kind in sorted(current):
        held = content.held_revisions(session, kind=kind)
        shown[kind] = [
            RevisionRow(revision, revision.revision == current[kind].revision, revision.revision in held)
            for revision in content.list_revisions(session, kind=kind)
        ]
    return shown


@router.get("", include_in_schema=False)
def content_page(request: Request, operator: OperatorDep, session: SessionDep, fabric: FabricDep) -> Response:
    context = {
        "operator": operator,
        "section": "content",
        "kinds": _kinds(session),
        "retention": fabric.settings.content_retention,
    }
    return render(request, "content.html", context)


@router.get("/{kind}/{revision}", include_in_schema=False)
def revision_page(
    request: Request, kind: Kind, revision: Revision, operator: OperatorDep, session: SessionDep
) -> Response:
    found = content.get_revision(session, kind=kind, revision=revision)
    files = [
        {"path": entry["path"], "size": int(entry["size"]), "sha256": entry["sha256"]}
        for entry in found.manifest
    ]
    context = {
        "operator": operator,
        "section": "content",
        "revision": found,
        "files": files,
        "total_size": size_text(sum(entry["size"] for entry in files)),
        "size_text": size_text,
    }
    return render(request, "content_revision.html", context)
