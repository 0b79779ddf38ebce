"""Content: blobs and revisions for operators (/api/v1), manifests and blobs for agents (/agent/v1)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response, status
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session
from starlette.datastructures import Headers
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from api.agent_auth import authenticate_agent
from api.deps import AdminDep, ChangeDep, FabricDep, SessionDep, ViewerDep
from api.errors import NotFound
from api.etags import none_match
from api.openapi import errors, not_modified
from api.params import Revision
from api.services import content
from api.services.content import BlobStore
from fabric_core.content_paths import MAX_PATH_LENGTH
from fabric_core.text import Text
from manager_db.models import Blob, ContentRevision

admin_router = APIRouter(tags=["content"])
agent_router = APIRouter(prefix="/agent/v1", tags=["agent"])

Kind = Annotated[str, Path(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Sha256 = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]
IMMUTABLE = "public, max-age=31536000, immutable"
OCTETS = "application/octet-stream"


class ContentFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    path: Text = Field(
        min_length=1,
        max_length=MAX_PATH_LENGTH,
        description="relative, '/' between parts; no empty, '.' or '..' part, backslash or control character",
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class RevisionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
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


class BlobOut(BaseModel):
    sha256: str
    size: int


@admin_router.put(
    "/blobs/{sha256}",
    response_model=BlobOut,
    status_code=status.HTTP_201_CREATED,
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "the file's bytes, any content type",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload_blob(sha256: Sha256, request: Request, fabric: FabricDep, _: AdminDep) -> BlobOut:
    """Upload one content file as the raw body, named by its SHA-256; the bytes must hash to the name."""
    size = await BlobStore(fabric.settings.blob_dir).put(sha256, request.stream())
    with Session(fabric.engine) as session:
        content.record_blob(session, sha256=sha256, size=size)
    return BlobOut(sha256=sha256, size=size)


@admin_router.head("/blobs/{sha256}", responses=errors(404))
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


@admin_router.get("/content/{kind}/revisions/{revision}", response_model=RevisionOut, responses=errors(404))
def get_revision(kind: Kind, revision: Revision, session: SessionDep, _: ViewerDep) -> RevisionOut:
    return _out(content.get_revision(session, kind=kind, revision=revision))


@agent_router.get(
    "/content/{kind}/{revision}", response_model=RevisionOut, responses={**not_modified(), **errors(404)}
)
async def manifest(kind: Kind, revision: Revision, request: Request, fabric: FabricDep) -> Response:
    """The manifest of one revision, with its digest as ETag (the document names the same digest)."""
    await authenticate_agent(request, fabric)
    with Session(fabric.engine) as session:
        found = content.get_revision(session, kind=kind, revision=revision)
    etag = f'"{found.manifest_sha256}"'
    if none_match(request.headers.get("if-none-match"), etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    return Response(
        _out(found).model_dump_json(),
        media_type="application/json",
        headers={"ETag": etag, "Cache-Control": IMMUTABLE},
    )


class BlobResponse(FileResponse):
    """A blob, with Range as RFC 9110 says: a Range header it cannot parse is ignored (the whole file,
    200) rather than a plain-text 400; one that starts beyond the end is a 416 in the one error shape."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:  # RFC 9110 section 14.2: a server may ignore the Range header
            return []

    @classmethod
    def unsatisfiable(cls, headers: Headers, etag: str, size: int) -> Response | None:
        """The 416 for a Range FileResponse would use and cannot satisfy, else None."""
        http_range, if_range = headers.get("range"), headers.get("if-range")
        if http_range is None or (if_range is not None and if_range != etag):
            return None  # no Range, or an If-Range that is not this blob's: the whole file
        try:
            cls._parse_range_header(http_range, size)
        except RangeNotSatisfiable:
            return JSONResponse(
                {"detail": f"the range starts beyond the end of the blob ({size} bytes)"},
                status_code=status.HTTP_416_RANGE_NOT_SATISFIABLE,
                headers={"Content-Range": f"bytes */{size}"},
            )
        return None


@agent_router.get(
    "/blobs/{sha256}",
    response_class=BlobResponse,
    responses={
        200: {"content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}}},
        206: {
            "description": "a byte range (Range: bytes=N-), to resume a download",
            "content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}},
        },
        **not_modified(),
        **errors(404, 416),
    },
)
async def blob(sha256: Sha256, request: Request, fabric: FabricDep) -> Response:
    """One content file; honours Range (resume) and If-None-Match (its ETag is its SHA-256)."""
    await authenticate_agent(request, fabric)
    store = BlobStore(fabric.settings.blob_dir)
    if not store.has(sha256):
        raise NotFound(f"blob {sha256} is not stored")
    etag = f'"{sha256}"'
    if none_match(request.headers.get("if-none-match"), etag):  # content-addressed: same name, same bytes
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    path = store.path(sha256)
    unsatisfiable = BlobResponse.unsatisfiable(request.headers, etag, path.stat().st_size)
    if unsatisfiable is not None:
        return unsatisfiable
    return BlobResponse(path, media_type=OCTETS, headers={"ETag": etag, "Cache-Control": IMMUTABLE})
