"""The one rule for the paths of a content manifest, checked by the manager and by every agent.

A path names a file inside the revision's tree on the agent, so it must not escape the tree, must mean
the same thing on every file system, and must not clash with another path of the same manifest:

- 1 to 512 characters, relative (no leading `/`), parts separated by single forward slashes;
- no empty part (`a//b`, `a/`), no `.` or `..` part (`./a`, `a/./b`, `a/../b`);
- no backslash (a separator on Windows), no control character (NUL, newline, ...), no lone surrogate;
- in one manifest: no path listed twice, and no path that is both a file and a directory (`a`, `a/b`).

The manager refuses a revision that breaks the rule (422), so that no agent is ever sent one it would
have to reject; the reference agent checks it again (`agent_stub.content`), since a manifest is only as
good as the manager that published it.
"""

from __future__ import annotations

from collections.abc import Iterable

from fabric_core.text import control_character

MAX_PATH_LENGTH = 512


class ContentPathError(ValueError):
    """A manifest path, or a set of them, that breaks the rule."""


def check_path(path: str) -> str:
    """`path` if it is a plain relative path; `ContentPathError` saying why not otherwise."""
    shown = repr(path) if len(path) <= 64 else f"{path[:40]!r}..."
    if not path:
        raise ContentPathError("a content path may not be empty")
    if len(path) > MAX_PATH_LENGTH:
        raise ContentPathError(f"content path {shown} is longer than {MAX_PATH_LENGTH} characters")
    if path.startswith("/"):
        raise ContentPathError(f"content path {shown} must be relative, not absolute")
    if "\\" in path:
        raise ContentPathError(f"content path {shown} holds a backslash: separate parts with '/'")
    found = control_character(path)
    if found is not None:
        raise ContentPathError(f"content path {shown} holds a control character or lone surrogate ({found})")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise ContentPathError(
            f"content path {shown} must be relative, with no empty, '.' or '..' parts (a//b, a/, ./a)"
        )
    return path


def check_manifest_paths(paths: Iterable[str]) -> None:
    """Every path follows `check_path`; none is listed twice; none is both a file and a directory."""
    files: set[str] = set()
    directories: set[str] = set()
    for path in paths:
        check_path(path)
        if path in files:
            raise ContentPathError(f"content path {path!r} is listed twice")
        files.add(path)
        parts = path.split("/")
        directories.update("/".join(parts[:i]) for i in range(1, len(parts)))
    if clash := files & directories:
        raise ContentPathError(f"content path {sorted(clash)[0]!r} is both a file and a directory")
