"""The agent's side of the Agent API (DESIGN.md §5), over one keep-alive `httpx.AsyncClient`.

It raises the `ManagerError` branch of `agent_stub.errors`, so that loops can tell "try again later"
(`ManagerUnreachable`, and its `ManagerBadResponse` and `ManagerUntrusted`) from "the manager said no"
(`ManagerRejected`).

Over https:// the client trusts what it is given (`ssl_context`: the agent's pinned CAs,
`agent_stub.trust`); `use_ssl_context` switches a running agent to the CAs a document named.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent_stub import AGENT_VERSION
from agent_stub.errors import ManagerBadResponse, ManagerRejected, ManagerUnreachable, ManagerUntrusted
from fabric_core.canonical import canonical_json, sha256_hex
from fabric_core.wire import EnrollRequest, EnrollResponse, HeartbeatRequest, HeartbeatResponse

log = logging.getLogger(__name__)

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
        self._timeout_s: float = 10.0
        self._transport: httpx.AsyncBaseTransport | None = None
        self._retiring: set[asyncio.Task[None]] = set()
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
        ssl_context: ssl.SSLContext | None = None,
    ) -> ManagerClient:
        """A client with its own pool; over https:// it trusts `ssl_context` only (None: the system
        store, for an identity that pinned nothing)."""
        http = _pool(timeout_s, transport, ssl_context)
        client = cls(server=server, agent_id=agent_id, secret=secret, http=http)
        client._owns_http = True
        client._timeout_s = timeout_s
        client._transport = transport
        return client

    def use_ssl_context(self, context: ssl.SSLContext | None) -> None:
        """Trust `context` from the next request on (the agent's CAs changed: a rotation).

        A pool lent by its owner (the fleet simulator) is the owner's to change: nothing happens. The old
        pool is closed once requests under way had their time (`timeout_s`): its open connections were
        verified under the old trust, which was the agent's until now, and a download cut short resumes.
        """
        if not self._owns_http:
            log.debug("the connection pool is shared: its owner decides what it trusts")
            return
        old, self._http = self._http, _pool(self._timeout_s, self._transport, context)
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, old: httpx.AsyncClient) -> None:
        try:
            await asyncio.sleep(self._timeout_s)
        finally:
            await old.aclose()

    async def aclose(self) -> None:
        for task in list(self._retiring):
            task.cancel()  # closes its pool at once
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
        ssl_context: ssl.SSLContext | None = None,
    ) -> EnrollResponse:
        """Trade an enrolment token for an identity (no authentication). Over https:// pass the pinned
        CA's `ssl_context`: the token is sent only once the server proved it has a certificate from it."""
        body = EnrollRequest(token=token, hostname=hostname, facts=facts)
        url = f"{normalize_server(server)}{API_PREFIX}/enroll"
        async with _pool(timeout_s, transport, ssl_context) as http:
            response = await _send(http, "POST", url, content=_dump(body))
        return _parse(EnrollResponse, response)

    @staticmethod
    async def ca_bundle(
        *, server: str, timeout_s: float = 10.0, transport: httpx.AsyncBaseTransport | None = None
    ) -> bytes:
        """`GET /agent/v1/ca`: the PEM bundle of the CAs the manager says agents trust.

        Fetched WITHOUT verifying the server's certificate: the agent has nothing to verify it with
        yet, nothing secret is sent, and the caller keeps only a certificate whose hash it pinned
        (`agent_stub.trust.pin`).
        """
        url = f"{normalize_server(server)}{API_PREFIX}/ca"
        async with httpx.AsyncClient(timeout=timeout_s, transport=transport, verify=False) as http:
            response = await _send(http, "GET", url, headers={"Accept": "application/x-pem-file"})
        return response.content

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
            raise _unreachable("GET", url, exc) from exc


def _pool(
    timeout_s: float, transport: httpx.AsyncBaseTransport | None, context: ssl.SSLContext | None
) -> httpx.AsyncClient:
    # verify=True (the system store) only for an identity that pinned nothing: plain HTTP, or older.
    return httpx.AsyncClient(timeout=timeout_s, transport=transport, verify=context or True)


def _unreachable(method: str, url: str, exc: httpx.TransportError) -> ManagerUnreachable:
    """The error for a transport failure: `ManagerUntrusted` when it was the certificate check."""
    cause: BaseException | None = exc
    for _ in range(8):  # httpx wraps httpcore's error, which wraps ssl's: a short chain (never a cycle)
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            return ManagerUntrusted(
                f"{method} {url}: the server's certificate is not trusted: {cause.verify_message}"
            )
        cause = cause.__cause__ or cause.__context__
    return ManagerUnreachable(f"{method} {url}: {type(exc).__name__}: {exc}")


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
        raise _unreachable(method, url, exc) from exc
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
