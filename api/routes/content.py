"""Content: blobs and revisions for operators (/api/v1), manifests and blobs for agents (/agent/v1)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session

from api.agent_auth import authenticate_agent
from api.deps import AdminDep, ChangeDep, FabricDep, SessionDep, ViewerDep
from api.errors import NotFound
from api.services import content
from api.services.content import BlobStore
from manager_db.models import Blob, ContentRevision

admin_router = APIRouter(tags=["content"])
agent_router = APIRouter(prefix="/agent/v1", tags=["agent"])

Kind = Annotated[str, Path(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Sha256 = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]
IMMUTABLE = "public, max-age=31536000, immutable"


class ContentFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=512)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class RevisionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    files: list[ContentFile] = Field(min_length=1, max_length=100_000)


class RevisionOut(BaseModel):
    kind: str
    revision: int
    manifest_sha256: str
    files: list[dict[str, Any]] = Field(description="[{path, size, sha256}], sorted by path")


def _out(revision: ContentRevision) -> RevisionOut:
    return RevisionOut(
        kind=revision.kind,
        revision=revision.revision,
        manifest_sha256=revision.manifest_sha256,
        files=revision.manifest,
    )


@admin_router.put("/blobs/{sha256}", status_code=status.HTTP_201_CREATED)
async def upload_blob(sha256: Sha256, request: Request, fabric: FabricDep, _: AdminDep) -> dict[str, Any]:
    """Upload one content file as the raw body, named by its SHA-256; the bytes must hash to the name."""
    size = await BlobStore(fabric.settings.blob_dir).put(sha256, request.stream())
    with Session(fabric.engine) as session:
        content.record_blob(session, sha256=sha256, size=size)
    return {"sha256": sha256, "size": size}


@admin_router.head("/blobs/{sha256}")
def blob_exists(sha256: Sha256, session: SessionDep, _: ViewerDep) -> Response:
    """200 if the blob is stored (no need to upload it again), 404 if not."""
    if session.get(Blob, sha256) is None:
        raise NotFound(f"blob {sha256} is not stored")
    return Response(status_code=status.HTTP_200_OK)


@admin_router.post(
    "/content/{kind}/revisions", response_model=RevisionOut, status_code=status.HTTP_201_CREATED
)
def publish_revision(kind: Kind, body: RevisionCreate, change: ChangeDep, fabric: FabricDep) -> RevisionOut:
    """Publish the next revision of `kind` from uploaded blobs; every document then names it."""
    published = content.publish_revision(
        change,
        kind=kind,
        files=[(f.path, f.sha256) for f in body.files],
        keep=fabric.settings.content_retention,
    )
    change.commit()
    store = BlobStore(fabric.settings.blob_dir)
    for sha256 in published.pruned_blobs:  # after the commit: a refused change deletes nothing
        store.delete(sha256)
    return _out(published.revision)


@admin_router.get("/content/{kind}/revisions", response_model=list[RevisionOut])
def list_revisions(kind: Kind, session: SessionDep, _: ViewerDep) -> list[RevisionOut]:
    return [_out(r) for r in content.list_revisions(session, kind=kind)]


@admin_router.get("/content/{kind}/revisions/{revision}", response_model=RevisionOut)
def get_revision(kind: Kind, revision: int, session: SessionDep, _: ViewerDep) -> RevisionOut:
    return _out(content.get_revision(session, kind=kind, revision=revision))


@agent_router.get("/content/{kind}/{revision}", response_model=RevisionOut)
async def manifest(kind: Kind, revision: int, request: Request, fabric: FabricDep) -> Response:
    """The manifest of one revision, with its digest as ETag (the document names the same digest)."""
    await authenticate_agent(request, fabric)
    with Session(fabric.engine) as session:
        found = content.get_revision(session, kind=kind, revision=revision)
    etag = f'"{found.manifest_sha256}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    return Response(
        _out(found).model_dump_json(),
        media_type="application/json",
        headers={"ETag": etag, "Cache-Control": IMMUTABLE},
    )


@agent_router.get(
    "/blobs/{sha256}",
    response_class=FileResponse,
    responses={206: {"description": "a byte range (Range: bytes=N-), to resume a download"}},
)
async def blob(sha256: Sha256, request: Request, fabric: FabricDep) -> Response:
    """One content file; honours Range (resume) and If-None-Match (its ETag is its SHA-256)."""
    await authenticate_agent(request, fabric)
    store = BlobStore(fabric.settings.blob_dir)
    if not store.has(sha256):
        raise NotFound(f"blob {sha256} is not stored")
    etag = f'"{sha256}"'
    if request.headers.get("if-none-match") == etag:  # content-addressed: the same name, the same bytes
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    return FileResponse(
        store.path(sha256),
        media_type="application/octet-stream",
        headers={"ETag": f'"{sha256}"', "Cache-Control": IMMUTABLE},
    )
