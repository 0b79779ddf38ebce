"""Content revisions (e.g. `definitions`): content-addressed blobs, numbered manifests, retention.

Operators upload files as blobs (`PUT /api/v1/blobs/{sha256}`, verified against the name), then
publish a revision that lists them by path. The current revision of every kind goes into every
effective document, so agents learn of it like of any other change and fetch only the blobs they lack.
Only the last `content_retention` revisions are kept, and never one that an agent still reports holding.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, delete, func, select

from api.errors import Invalid, NotFound
from api.services.change import Change
from fabric_core.canonical import canonical_json, sha256_hex
from fabric_core.content_paths import ContentPathError, check_manifest_paths
from manager_db.models import Agent, Blob, ContentRevision

SHA256_HEX = 64
RESERVED_KINDS = frozenset({"blobs", "partial"})
"""Names the agent's content store uses for itself (state_dir/content/blobs, .../partial)."""


class BlobStore:
    """Files named by their SHA-256 under one directory (`ab/abcdef...`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    async def put(self, sha256: str, chunks: AsyncIterator[bytes]) -> int:
        """Store the bytes if they hash to `sha256`; return the size. Written whole, then renamed."""
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as handle:
                async for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    handle.write(chunk)
            if digest.hexdigest() != sha256:
                raise Invalid(f"the uploaded bytes hash to {digest.hexdigest()}, not {sha256}")
            os.replace(temporary, target)
        finally:
            with contextlib.suppress(FileNotFoundError):  # already renamed into place
                os.unlink(temporary)
        return size

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)


def check_sha256(value: str) -> str:
    if len(value) != SHA256_HEX or any(c not in "0123456789abcdef" for c in value):
        raise Invalid(f"{value!r} is not a lowercase hex SHA-256")
    return value


def record_blob(session: Session, *, sha256: str, size: int) -> Blob:
    blob = session.get(Blob, sha256)
    if blob is None:
        blob = Blob(sha256=sha256, size=size)
        session.add(blob)
        session.commit()
    return blob


def manifest_digest(files: list[dict[str, Any]]) -> str:
    return sha256_hex(canonical_json(files))


@dataclass(frozen=True)
class Published:
    revision: ContentRevision
    pruned_blobs: list[str]
    """Blobs no revision uses any more: the caller deletes their files after the commit."""


def publish_revision(change: Change, *, kind: str, files: Iterable[tuple[str, str]], keep: int) -> Published:
    """A new revision of `kind` from (path, sha256) pairs whose blobs were uploaded; older ones pruned."""
    if kind in RESERVED_KINDS:
        raise Invalid(f"content kind {kind!r} is reserved; choose another name")
    files = list(files)
    try:
        check_manifest_paths(path for path, _ in files)  # the contract's rule: agents check the same
    except ContentPathError as exc:
        raise Invalid(str(exc)) from exc
    manifest: dict[str, dict[str, Any]] = {}
    for path, sha256 in files:
        blob = change.session.get(Blob, check_sha256(sha256))
        if blob is None:
            raise Invalid(f"blob {sha256} has not been uploaded (PUT /api/v1/blobs/{sha256} first)")
        manifest[path] = {"path": path, "size": blob.size, "sha256": sha256}
    if not manifest:
        raise Invalid("a content revision needs at least one file")
    ordered = [manifest[path] for path in sorted(manifest)]
    latest = change.session.exec(
        select(func.max(ContentRevision.revision)).where(col(ContentRevision.kind) == kind)
    ).one()
    revision = ContentRevision(
        kind=kind, revision=(latest or 0) + 1, manifest=ordered, manifest_sha256=manifest_digest(ordered)
    )
    change.session.add(revision)
    change.session.flush()
    change.audit("content.publish", f"content:{kind}", revision=revision.revision, files=len(ordered))
    pruned = prune_revisions(change.session, kind=kind, keep=keep)
    change.refresh(None)  # every document names the current revision of every kind
    return Published(revision, pruned)


def prune_revisions(session: Session, *, kind: str, keep: int) -> list[str]:
    """Drop revisions beyond the newest `keep`, except those agents still hold; return orphaned blobs."""
    revisions = session.exec(
        select(ContentRevision)
        .where(col(ContentRevision.kind) == kind)
        .order_by(col(ContentRevision.revision).desc())
    ).all()
    held = held_revisions(session, kind=kind)
    doomed = [r for r in revisions[keep:] if r.revision not in held]
    if not doomed:
        return []
    for revision in doomed:
        session.delete(revision)
    session.flush()
    return _orphaned_blobs(session)


def held_revisions(session: Session, *, kind: str) -> set[int]:
    """Revisions of `kind` that agents reported holding at their last heartbeat (`status.content`)."""
    held: set[int] = set()
    for status in session.exec(select(Agent.status).where(col(Agent.revoked_at).is_(None))).all():
        content = status.get("content") if isinstance(status, dict) else None
        revision = content.get(kind) if isinstance(content, dict) else None
        if isinstance(revision, int):
            held.add(revision)
    return held


def _orphaned_blobs(session: Session) -> list[str]:
    used = {
        f["sha256"] for manifest in session.exec(select(ContentRevision.manifest)).all() for f in manifest
    }
    orphans = [sha for sha in session.exec(select(Blob.sha256)).all() if sha not in used]
    if orphans:
        session.exec(delete(Blob).where(col(Blob.sha256).in_(orphans)))
    return orphans


def list_revisions(session: Session, *, kind: str) -> list[ContentRevision]:
    return list(
        session.exec(
            select(ContentRevision)
            .where(col(ContentRevision.kind) == kind)
            .order_by(col(ContentRevision.revision).desc())
        ).all()
    )


def get_revision(session: Session, *, kind: str, revision: int) -> ContentRevision:
    found = session.exec(
        select(ContentRevision).where(
            col(ContentRevision.kind) == kind, col(ContentRevision.revision) == revision
        )
    ).first()
    if found is None:
        raise NotFound(f"no revision {revision} of content {kind!r}")
    return found


def current_revisions(session: Session) -> dict[str, ContentRevision]:
    """The newest revision of every kind."""
    latest: dict[str, ContentRevision] = {}
    for revision in session.exec(select(ContentRevision).order_by(col(ContentRevision.revision))).all():
        latest[revision.kind] = revision
    return latest
