"""Durable file operations of the agent: the one module that fsyncs and renames.

Every file the agent replaces (its state files, the log spool's `state.json` and batches, a content
manifest, the simulator's identities) is replaced the same way by `write_atomically`:

1. the bytes go to a temporary file in the target's directory, created 0600 by `mkstemp` whatever the
   umask, so that a secret is never readable by others, not even briefly;
2. the file is set to `mode`, fsync'd, then renamed over the target (`os.replace`, atomic on POSIX);
3. the directory is fsync'd, so that the rename itself survives a power loss.

A reader (or a crash) sees the old bytes or the new ones, never a torn file, and a failure before the
rename leaves the old file and no temporary one. The other helpers are the same steps for what is not a
whole-file replacement: an fsync'd append (`append_durably`), a symlink switched in one rename
(`symlink_atomically`), a finished file's bytes flushed before it is renamed into place (`fsync_file`,
`move_into_place`). Callers create the directories, with the modes they want.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

FILE_MODE = 0o600


def write_atomically(path: Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Replace `path` with `data` (mode `mode`) so that a reader or a crash sees old or new, never a mix."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if mode != FILE_MODE:
                os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the names in directory `path` (a rename, a new file) durable across a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush the bytes of an existing file to disk (before it is renamed into place)."""
    with Path(path).open("rb") as handle:
        os.fsync(handle.fileno())


def append_durably(path: Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Append `data` to `path` (created with `mode` if absent) in full, then fsync: one write, one sync."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def move_into_place(source: Path, target: Path) -> None:
    """Rename `source` over `target` in one atomic step (durable once its directory is fsync'd)."""
    os.replace(source, target)


def symlink_atomically(link: Path, target: str) -> None:
    """Point the symlink `link` at `target` in one rename: a reader sees the old target or the new one.

    The new link is made beside it (`.<name>.tmp`) and renamed over it; then the directory is fsync'd.
    """
    link = Path(link)
    staged = link.with_name(f".{link.name}.tmp")
    staged.unlink(missing_ok=True)
    os.symlink(target, staged)
    os.replace(staged, link)
    fsync_dir(link.parent)
