"""Content downloads: fetch the revisions a document names, verify every byte, switch atomically.

The document names, for each content kind, a revision and the SHA-256 of its manifest. The agent fetches
that manifest, checks its digest against the signed document (so the file list is as trustworthy as the
signature), downloads only the blobs it lacks, verifies each one, and only then switches to the revision.

Layout of the store directory (`<state_dir>/content`):

    blobs/<sha256>                     verified files, shared between revisions and kinds (read-only)
    partial/<sha256>                   an interrupted download, resumed with `Range: bytes=N-`
    <kind>/<revision>/<path>...        one revision's tree: hard links to blobs (copies where links fail)
    <kind>/<revision>.manifest.json    its manifest: which blobs the tree needs (for the clean-up)
    <kind>/current -> <revision>       the revision in force

`current` is a relative symlink replaced by the rename of a temporary symlink (`symlink_atomically`): one
atomic rename, so a reader of `<kind>/current/<path>` sees the old tree or the new one, never a mix, and
the link is itself the persisted record of what the agent holds (`held()`): there is no second file to
disagree with it after a crash. A pointer file would be as atomic, but every reader would then have to
resolve it by hand.
The previous revision's tree is kept until the next switch, so a reader that resolved `current` just
before a switch can finish; older trees and blobs no kept tree uses are deleted.

Kinds are names the manager allows (`^[a-z][a-z0-9_]{0,31}$`) except `blobs` and `partial`, which this
layout reserves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from agent_stub.core import AgentCore
from agent_stub.errors import ContentRejected, ManagerRejected, ManagerUnreachable
from agent_stub.files import fsync_file, move_into_place, symlink_atomically, write_atomically
from agent_stub.manager_client import ContentManifest
from fabric_core.content_paths import ContentPathError, check_manifest_paths
from fabric_core.wire import ContentEntry, EffectiveDocument

log = logging.getLogger(__name__)

BLOBS = "blobs"
PARTIAL = "partial"
CURRENT = "current"
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_RESERVED = frozenset({BLOBS, PARTIAL})
_MANIFEST_SUFFIX = ".manifest.json"
_CHUNK = 1 << 20
_BLOB_MODE = 0o444  # the trees are hard links to the blobs: read-only says "do not edit in place"

Sleep = Callable[[float], Awaitable[None]]


@runtime_checkable
class ContentClient(Protocol):
    """What content downloads need from the manager (`ManagerClient`)."""

    async def get_manifest(
        self, kind: str, revision: int, *, etag: str | None = None
    ) -> tuple[ContentManifest | None, str | None]: ...

    async def download_blob(self, sha256: str, target: Path, *, offset: int = 0) -> None: ...


class Outcome(StrEnum):
    SWITCHED = "switched"
    HELD = "held"
    """The agent already holds the revision the document names."""
    DISABLED = "disabled"
    """The document turns downloads off."""
    REJECTED = "rejected"
    """Not retried until another document (or a restart) asks again."""
    FAILED = "failed"
    """Transient (manager unreachable, disk error): retried with back-off."""


@dataclass
class KindResult:
    kind: str
    revision: int
    outcome: Outcome
    fetched: int = 0
    """Blobs downloaded."""
    reused: int = 0
    """Blobs the agent already had."""
    bytes_fetched: int = 0
    reason: str | None = None


@dataclass
class SyncReport:
    kinds: dict[str, KindResult] = field(default_factory=dict)
    delay_s: float = 0.0

    @property
    def retry(self) -> bool:
        return any(r.outcome is Outcome.FAILED for r in self.kinds.values())


class ContentSync:
    """Keeps `<store_dir>/<kind>/current` on the revisions the held document names.

    `sync(doc)` does one pass; `schedule(doc)` runs passes in a background task (one at a time, retried
    with back-off while the manager is unreachable, superseded by a document that names other content).
    """

    def __init__(
        self,
        core: AgentCore,
        client: ContentClient,
        store_dir: Path,
        rng: random.Random | None = None,
        *,
        sleep: Sleep = asyncio.sleep,
        max_attempts: int = 3,
        retry_min_s: float = 1.0,
        retry_max_s: float = 300.0,
    ) -> None:
        self._core = core
        self._client = client
        self.root = Path(store_dir)
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._max_attempts = max_attempts
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._held = self._load_held()
        self._task: asyncio.Task[None] | None = None
        self._task_target: tuple[Any, ...] | None = None

    # --- what the agent holds ----------------------------------------------------------------------

    def held(self) -> dict[str, int]:
        """The revision of each kind the agent has switched to."""
        return dict(self._held)

    def status(self) -> dict[str, Any]:
        """A heartbeat status source: the manager's retention keeps the revisions agents hold."""
        return {"content": self.held()}

    def path(self, kind: str) -> Path:
        """Where readers find the files of `kind` in force (`<kind>/current`)."""
        return self.root / kind / CURRENT

    # --- one pass ----------------------------------------------------------------------------------

    async def sync(self, doc: EffectiveDocument, *, spread: bool = True) -> SyncReport:
        """Bring every kind the document names to its revision; `spread`: first wait a random delay."""
        report = SyncReport()
        wanted: dict[str, ContentEntry] = {}
        for kind, entry in sorted(doc.content.items()):
            if self._held.get(kind) == entry.revision:
                report.kinds[kind] = KindResult(kind, entry.revision, Outcome.HELD)
            else:
                wanted[kind] = entry
        if not wanted:
            return report
        if not doc.communication.download_enabled:
            log.info(
                "content downloads are disabled by serial %d: not fetching %s", doc.serial, _names(wanted)
            )
            for kind, entry in wanted.items():
                report.kinds[kind] = KindResult(kind, entry.revision, Outcome.DISABLED)
            return report
        if spread and doc.communication.randomize_s > 0:
            # Every agent learns of a new revision at once; the window spreads their downloads.
            report.delay_s = self._rng.uniform(0, doc.communication.randomize_s)
            log.info("downloading %s in %.1f s (randomisation window)", _names(wanted), report.delay_s)
            await self._sleep(report.delay_s)
        for kind, entry in wanted.items():
            report.kinds[kind] = await self._sync_kind(kind, entry)
        if all(r.outcome in (Outcome.SWITCHED, Outcome.HELD) for r in report.kinds.values()):
            self._drop_partials()  # what is left belongs to superseded revisions
        return report

    async def _sync_kind(self, kind: str, entry: ContentEntry) -> KindResult:
        result = KindResult(kind, entry.revision, Outcome.SWITCHED)
        try:
            _check_kind(kind)
            manifest = await self._manifest(kind, entry)
            await self._fetch_missing(manifest, result)
            self._switch(kind, manifest)
        except (ContentRejected, ManagerRejected) as exc:
            log.error(
                "content %s revision %d rejected, holding %s: %s", kind, entry.revision, self._was(kind), exc
            )
            result.outcome, result.reason = Outcome.REJECTED, str(exc)
        except (ManagerUnreachable, OSError) as exc:
            log.warning("content %s revision %d not fetched yet: %s", kind, entry.revision, exc)
            result.outcome, result.reason = Outcome.FAILED, str(exc)
        return result

    async def _manifest(self, kind: str, entry: ContentEntry) -> ContentManifest:
        """The revision's manifest, accepted only if its digest is the one the signed document names."""
        manifest, _ = await self._client.get_manifest(kind, entry.revision)
        if manifest is None:  # no ETag was sent, so a 304 is the manager's mistake
            raise ContentRejected("the manager answered 304 to a manifest request without an ETag")
        if (manifest.kind, manifest.revision) != (kind, entry.revision):
            raise ContentRejected(
                f"asked for {kind} revision {entry.revision}, got {manifest.kind} {manifest.revision}"
            )
        digest = manifest.digest()
        if digest != entry.manifest_sha256:
            raise ContentRejected(
                f"the manifest hashes to {digest}, the document names {entry.manifest_sha256}"
            )
        _check_paths(f.path for f in manifest.files)
        return manifest

    # --- blobs -------------------------------------------------------------------------------------

    async def _fetch_missing(self, manifest: ContentManifest, result: KindResult) -> None:
        """Download the blobs the agent lacks (the delta); reuse, after verifying, those it has."""
        needed = {f.sha256: f.size for f in manifest.files}
        for sha256, size in needed.items():
            if await self._have(sha256, size):
                result.reused += 1
            else:
                result.bytes_fetched += await self._fetch(sha256, size)
                result.fetched += 1
        log.info(
            "content %s revision %d: %d file(s), %d blob(s) reused, %d fetched (%d bytes)",
            manifest.kind,
            manifest.revision,
            len(manifest.files),
            result.reused,
            result.fetched,
            result.bytes_fetched,
        )

    async def _have(self, sha256: str, size: int) -> bool:
        """Whether a good copy is stored; re-hashed, since trees are hard links a reader could edit."""
        blob = self._blob(sha256)
        if not blob.is_file():
            return False
        if blob.stat().st_size == size and await asyncio.to_thread(_file_sha256, blob) == sha256:
            return True
        log.warning("stored blob %s is damaged: fetching it again", sha256)
        blob.unlink(missing_ok=True)
        return False

    async def _fetch(self, sha256: str, size: int) -> int:
        """Download one blob into `partial/`, verify it, move it to `blobs/`; return the bytes received."""
        partial = self.root / PARTIAL / sha256
        partial.parent.mkdir(parents=True, exist_ok=True)
        received = 0
        for attempt in range(1, self._max_attempts + 1):
            offset = partial.stat().st_size if partial.exists() else 0
            if offset > size:  # longer than the file can be: nothing in it is worth keeping
                partial.unlink()
                offset = 0
            if offset:
                log.info("resuming blob %s at byte %d of %d", sha256, offset, size)
            if offset < size:
                await self._client.download_blob(sha256, partial, offset=offset)
                received += max(partial.stat().st_size - offset, 0)
            if await asyncio.to_thread(_verify_and_flush, partial, sha256, size):
                os.chmod(partial, _BLOB_MODE)
                self._blob(sha256).parent.mkdir(parents=True, exist_ok=True)
                move_into_place(partial, self._blob(sha256))
                return received
            # Never resumed: the bad bytes may be anywhere in the file.
            partial.unlink(missing_ok=True)
            log.warning("blob %s failed verification (attempt %d of %d)", sha256, attempt, self._max_attempts)
        raise ContentRejected(f"blob {sha256} failed verification {self._max_attempts} times")

    def _blob(self, sha256: str) -> Path:
        return self.root / BLOBS / sha256

    # --- switching ---------------------------------------------------------------------------------

    def _switch(self, kind: str, manifest: ContentManifest) -> None:
        """Build the revision's tree beside the current one, then point `current` at it in one rename."""
        kind_dir = self.root / kind
        kind_dir.mkdir(parents=True, exist_ok=True)
        revision = str(manifest.revision)
        self._build_tree(kind_dir, manifest)
        write_atomically(kind_dir / f"{revision}{_MANIFEST_SUFFIX}", manifest.model_dump_json().encode())
        symlink_atomically(kind_dir / CURRENT, revision)  # relative: the state directory may move
        previous = self._held.get(kind)
        self._held[kind] = manifest.revision
        log.info(
            "content %s: switched to revision %d (was %s)",
            kind,
            manifest.revision,
            "none" if previous is None else previous,
        )
        self._collect(kind_dir, keep={manifest.revision, previous})

    def _build_tree(self, kind_dir: Path, manifest: ContentManifest) -> None:
        """`<kind>/<revision>/`, complete or absent: built in a temporary directory, then renamed."""
        staging = Path(tempfile.mkdtemp(dir=kind_dir, prefix=f".{manifest.revision}."))
        try:
            for file in manifest.files:
                target = staging.joinpath(*file.path.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(self._blob(file.sha256), target)
            tree = kind_dir / str(manifest.revision)
            if tree.exists():  # left by an earlier attempt that did not switch: rebuilt, not trusted
                shutil.rmtree(tree)
            os.rename(staging, tree)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _collect(self, kind_dir: Path, *, keep: set[int | None]) -> None:
        """Delete the trees of `kind_dir` beyond `keep`, then blobs that no kept tree of any kind uses."""
        kept = {str(revision) for revision in keep if revision is not None}
        for entry in kind_dir.iterdir():
            name = entry.name.removesuffix(_MANIFEST_SUFFIX)
            if entry.name == CURRENT or name in kept:
                continue
            _remove(entry)
        used = self._used_blobs()
        blobs = self.root / BLOBS
        for blob in blobs.iterdir() if blobs.is_dir() else ():
            if blob.name not in used:
                blob.unlink(missing_ok=True)

    def _used_blobs(self) -> set[str]:
        used: set[str] = set()
        for manifest_file in self.root.glob(f"*/*{_MANIFEST_SUFFIX}"):
            try:
                manifest = ContentManifest.model_validate_json(manifest_file.read_bytes())
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable %s: %s", manifest_file, exc)
                continue
            used.update(f.sha256 for f in manifest.files)
        return used

    def _drop_partials(self) -> None:
        partial = self.root / PARTIAL
        for entry in partial.iterdir() if partial.is_dir() else ():
            _remove(entry)

    def _load_held(self) -> dict[str, int]:
        held: dict[str, int] = {}
        for link in self.root.glob(f"*/{CURRENT}"):
            try:
                revision = int(os.readlink(link))
            except (OSError, ValueError) as exc:
                log.warning("ignoring %s: not a link to a revision (%s)", link, exc)
                continue
            if (link.parent / str(revision)).is_dir():
                held[link.parent.name] = revision
            else:
                log.warning("ignoring %s: revision %d is missing", link, revision)
        return held

    def _was(self, kind: str) -> str:
        revision = self._held.get(kind)
        return "nothing" if revision is None else f"revision {revision}"

    # --- the background task -----------------------------------------------------------------------

    def schedule(self, doc: EffectiveDocument | None = None) -> None:
        """Sync towards `doc` (default: the held document) in the background; needs a running loop.

        A pass already under way for the same content goes on (a new serial that changes only policies
        must not restart a download); one for other content is cancelled, and its partial files are
        resumed by the new pass.
        """
        doc = doc if doc is not None else self._core.document
        if doc is None:
            return
        target = _target(doc)
        running = self._task is not None and not self._task.done()
        if running and target == self._task_target:
            return
        previous = self._task
        if running and previous is not None:
            log.info("content sync superseded by serial %d", doc.serial)
            previous.cancel()
        self._task_target = target
        self._task = asyncio.get_running_loop().create_task(
            self._run(doc, previous), name=f"content-{self._core.identity.agent_id}"
        )

    async def wait(self) -> None:
        """Wait until no pass is under way (a pass that fails for good ends too: see its log)."""
        while self._task is not None and not self._task.done():
            await asyncio.wait({self._task})  # a superseding pass may replace it meanwhile

    async def aclose(self) -> None:
        """Cancel the pass under way, if any (partial files stay, to be resumed)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, doc: EffectiveDocument, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            # One pass at a time touches the store. `wait`, not `await`: the previous pass ends cancelled,
            # and suppressing that CancelledError here would also swallow this pass's own cancellation.
            await asyncio.wait({previous})
        failures = 0
        try:
            report = await self.sync(doc)
            while report.retry:
                failures += 1
                delay = self._backoff_s(failures)
                log.info("retrying content downloads in %.1f s", delay)
                await self._sleep(delay)
                report = await self.sync(doc, spread=False)  # the back-off is jittered already
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must not take the agent down: it keeps its content and retries on the next document.
            log.exception("content sync failed unexpectedly")

    def _backoff_s(self, failures: int) -> float:
        ceiling = min(self._retry_max_s, self._retry_min_s * 2.0 ** min(failures - 1, 32))
        return self._rng.uniform(self._retry_min_s, max(ceiling, self._retry_min_s))


# --- helpers -----------------------------------------------------------------------------------------


def _target(doc: EffectiveDocument) -> tuple[Any, ...]:
    """What a sync pass aims at: two documents with the same target need the same downloads."""
    entries = tuple(sorted((k, e.revision, e.manifest_sha256) for k, e in doc.content.items()))
    return (doc.communication.download_enabled, entries)


def _names(wanted: dict[str, ContentEntry]) -> str:
    return ", ".join(f"{kind} revision {entry.revision}" for kind, entry in wanted.items())


def _check_kind(kind: str) -> None:
    if not _KIND.match(kind) or kind in _RESERVED:
        raise ContentRejected(f"content kind {kind!r} is not a name this agent can store")


def _check_paths(paths: Iterable[str]) -> None:
    """The contract's path rule (`fabric_core.content_paths`), the manager's own: nothing escapes the
    tree, nothing clashes."""
    try:
        check_manifest_paths(paths)
    except ContentPathError as exc:
        raise ContentRejected(str(exc)) from exc


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_and_flush(path: Path, sha256: str, size: int) -> bool:
    """True if `path` holds exactly the blob; then also on disk, so a switch never outlives its bytes."""
    if not path.exists() or path.stat().st_size != size or _file_sha256(path) != sha256:
        return False
    fsync_file(path)
    return True


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)
        os.chmod(target, _BLOB_MODE)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
