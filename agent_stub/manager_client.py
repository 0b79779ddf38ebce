"""The agent's side of the Agent API (DESIGN.md §5), over one keep-alive `httpx.AsyncClient`.

It raises the `ManagerError` branch of `agent_stub.errors`, so that loops can tell "try again later"
(`ManagerUnreachable`, and its `ManagerBadResponse`) from "the manager said no" (`ManagerRejected`).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent_stub import AGENT_VERSION
from agent_stub.errors import ManagerBadResponse, ManagerRejected, ManagerUnreachable
from fabric_core.canonical import canonical_json, sha256_hex
from fabric_core.wire import EnrollRequest, EnrollResponse, HeartbeatRequest, HeartbeatResponse

API_PREFIX = "/agent/v1"
_JSON = "application/json"
_Model = TypeVar("_Model", bound=BaseModel)


class ContentFile(BaseModel):
    """One file of a content revision. Unknown fields are kept: they are part of the manifest's digest."""

    model_config = ConfigDict(extra="allow")

    path: str = Field(min_length=1)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ContentManifest(BaseModel):
    """`GET /agent/v1/content/{kind}/{revision}`: the files of one revision, sorted by path."""

    model_config = ConfigDict(extra="ignore")

    kind: str
    revision: int
    manifest_sha256: str
    files: list[ContentFile]

    def digest(self) -> str:
        """The SHA-256 of the canonical file list: what the signed document names, whatever this says."""
        return sha256_hex(canonical_json([f.model_dump() for f in self.files]))


def normalize_server(server: str) -> str:
    """`https://host:port` with no trailing slash; raises ValueError for anything but http(s)."""
    url = httpx.URL(server.strip())
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"server must be an http:// or https:// URL, got {server!r}")
    return str(url).rstrip("/")


def _headers() -> dict[str, str]:
    return {"User-Agent": f"policycast-agent/{AGENT_VERSION}", "Accept": _JSON}


LEAN_DROPPED = ("Accept", "Accept-Encoding", "Connection", "User-Agent")
"""Headers a heartbeat goes without (docs/performance.md, benchmark 3: 118 of its bytes). The manager
answers JSON whatever `Accept` says and never compresses; HTTP/1.1 keeps connections alive without
`Connection: keep-alive`; the agent's version reaches the manager in the heartbeat's `status` (sent
after every start), and the manager keeps no access log to read a `User-Agent` from. What is left: Host,
Content-Length (both written by httpx), Authorization and Content-Type. Removed from the request, not
from the client, so a client shared among agents (the fleet simulator) keeps its defaults for other
requests: enrolment, config fetches and downloads still say who they are."""


class ManagerClient:
    """Authenticated calls of one agent.

    Pass `http` to share one connection pool among many agents (the fleet simulator); the client then
    does not close it. Use `for_agent` to get a client that owns its pool.
    """

    def __init__(self, *, server: str, agent_id: str, secret: str, http: httpx.AsyncClient) -> None:
        self.server = normalize_server(server)
        self._http = http
        self._owns_http = False
        # DESIGN.md §5: `Bearer <secret>`; the manager finds the agent by the secret's hash.
        self._auth = {"Authorization": f"Bearer {secret}"}

    @classmethod
    def for_agent(
        cls,
        *,
        server: str,
        agent_id: str,
        secret: str,
        timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> ManagerClient:
        http = httpx.AsyncClient(timeout=timeout_s, transport=transport)
        client = cls(server=server, agent_id=agent_id, secret=secret, http=http)
        client._owns_http = True
        return client

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- the Agent API -----------------------------------------------------------------------------

    @staticmethod
    async def enroll(
        *,
        server: str,
        token: str,
        hostname: str,
        facts: dict[str, Any],
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> EnrollResponse:
        """Trade an enrolment token for an identity (no authentication)."""
        body = EnrollRequest(token=token, hostname=hostname, facts=facts)
        url = f"{normalize_server(server)}{API_PREFIX}/enroll"
        async with httpx.AsyncClient(timeout=timeout_s, transport=transport) as http:
            response = await _send(http, "POST", url, content=_dump(body))
        return _parse(EnrollResponse, response)

    async def heartbeat(self, request: HeartbeatRequest) -> HeartbeatResponse:
        """One heartbeat, with only the headers the manager needs (`LEAN_DROPPED`): it is most of the
        agent's traffic, and at a few hundred bytes each, every header counts."""
        url = f"{self.server}{API_PREFIX}/heartbeat"
        response = await _send(
            self._http, "POST", url, content=_dump(request), headers=self._auth, drop=LEAN_DROPPED
        )
        return _parse(HeartbeatResponse, response)

    async def get_config(
        self, etag: str | None, *, location_id: int | None = None
    ) -> tuple[bytes | None, str | None]:
        """The current envelope and its ETag, or `(None, etag)` when the manager says 304.

        `location_id` picks one of the group's locations; without it the manager serves the Default one.
        """
        headers = dict(self._auth)
        if etag:
            headers["If-None-Match"] = etag
        url = f"{self.server}{API_PREFIX}/config"
        if location_id is not None:
            url += f"?location_id={location_id}"
        response = await _send(self._http, "GET", url, headers=headers)
        if response.status_code == httpx.codes.NOT_MODIFIED:
            return None, etag
        return response.content, response.headers.get("ETag")

    # --- content -----------------------------------------------------------------------------------

    async def get_manifest(
        self, kind: str, revision: int, *, etag: str | None = None
    ) -> tuple[ContentManifest | None, str | None]:
        """The manifest of one revision and its ETag (its digest), or `(None, etag)` on 304."""
        headers = dict(self._auth)
        if etag:
            headers["If-None-Match"] = etag
        url = f"{self.server}{API_PREFIX}/content/{kind}/{revision}"
        response = await _send(self._http, "GET", url, headers=headers)
        if response.status_code == httpx.codes.NOT_MODIFIED:
            return None, etag
        return _parse(ContentManifest, response), response.headers.get("ETag")

    async def download_blob(self, sha256: str, target: Path, *, offset: int = 0) -> None:
        """Stream blob `sha256` into `target`, appending from `offset` (`Range: bytes=offset-`).

        A 206 appends to the bytes already there; a 200 (the manager ignored the range) truncates and
        starts over. Bytes received before a failure stay in `target`, so the caller can resume. The
        caller verifies the digest: nothing here trusts the bytes.
        """
        url = f"{self.server}{API_PREFIX}/blobs/{sha256}"
        headers = {**_headers(), **self._auth, "Accept": "application/octet-stream"}
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
        try:
            async with self._http.stream("GET", url, headers=headers) as response:
                await _raise_for_streamed_status("GET", url, response)
                mode = "ab" if _resumes(response, offset, url) else "wb"
                with target.open(mode) as handle:
                    async for chunk in response.aiter_bytes():
                        handle.write(chunk)
        except httpx.TransportError as exc:  # also a connection dropped mid-body
            raise ManagerUnreachable(f"GET {url}: {type(exc).__name__}: {exc}") from exc


def _dump(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="json", exclude_none=True))


async def _send(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
) -> httpx.Response:
    """One request, with transport failures and error statuses turned into `ManagerError`s.

    `drop`: headers not to send, whether the agent's (`_headers`) or the client's defaults (httpx's
    `Accept`, `Accept-Encoding`, `Connection`, `User-Agent`).
    """
    all_headers = {**_headers(), **(headers or {})}
    if content is not None:
        all_headers["Content-Type"] = _JSON
    try:
        request = http.build_request(method, url, content=content, headers=all_headers)
        for name in drop:
            request.headers.pop(name, None)
        response = await http.send(request)
    except httpx.TransportError as exc:  # connect errors, timeouts, dropped connections
        raise ManagerUnreachable(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code >= 500:
        raise ManagerUnreachable(f"{method} {url}: HTTP {response.status_code}")
    if response.status_code >= 400:
        raise ManagerRejected(response.status_code, _detail(response))
    return response


async def _raise_for_streamed_status(method: str, url: str, response: httpx.Response) -> None:
    """`_send`'s mapping of error statuses, for a streamed response (whose body is read only on error)."""
    if response.status_code >= 500:
        raise ManagerUnreachable(f"{method} {url}: HTTP {response.status_code}")
    if response.status_code >= 400:
        await response.aread()
        raise ManagerRejected(response.status_code, _detail(response))


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-\d+/(?:\d+|\*)$")


def _resumes(response: httpx.Response, offset: int, url: str) -> bool:
    """True for a 206 that continues at `offset`, False for a 200 (start over); anything else is bad."""
    if response.status_code == httpx.codes.OK:
        return False
    if response.status_code == httpx.codes.PARTIAL_CONTENT and offset > 0:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match is not None and int(match.group(1)) == offset:
            return True
    raise ManagerBadResponse(
        f"GET {url}: HTTP {response.status_code} with Content-Range "
        f"{response.headers.get('Content-Range')!r} for a download from byte {offset}"
    )


def _detail(response: httpx.Response) -> str:
    """The `detail` of a 4xx body (DESIGN.md §5), else a short excerpt of the body."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else orjson.dumps(detail).decode()
    return response.text[:200]


def _parse(model: type[_Model], response: httpx.Response) -> _Model:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise ManagerBadResponse(f"{response.request.url}: not a valid {model.__name__}: {exc}") from exc
