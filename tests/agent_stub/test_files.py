"""The agent's durable file operations: whole bytes, private modes, no temporary file left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent_stub import files
from agent_stub.files import (
    append_durably,
    fsync_dir,
    fsync_file,
    move_into_place,
    symlink_atomically,
    write_atomically,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_write_atomically_writes_the_bytes_0600_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "identity.json"
    old_umask = os.umask(0)  # a umask that would leave a plain open() world-writable
    try:
        write_atomically(target, b"secret")
    finally:
        os.umask(old_umask)

    assert target.read_bytes() == b"secret"
    assert _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["identity.json"]


def test_write_atomically_replaces_a_file_and_keeps_the_mode_asked_for(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_atomically(target, b"old")
    write_atomically(target, b"new, and longer than the old bytes")
    assert target.read_bytes() == b"new, and longer than the old bytes"
    assert _mode(target) == 0o600

    write_atomically(target, b"shared", mode=0o644)
    assert (target.read_bytes(), _mode(target)) == (b"shared", 0o644)


def test_write_atomically_goes_through_a_temporary_file_beside_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "current.json"
    write_atomically(target, b"old")
    seen: list[tuple[Path, bytes, bytes, int]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        # At the moment of the swap the target still holds the old bytes, the temp file the new ones.
        seen.append((Path(src), Path(src).read_bytes(), Path(dst).read_bytes(), _mode(Path(src))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_atomically(target, b"new")

    [(temporary, new, old, mode)] = seen
    assert temporary.parent == tmp_path and temporary.name.startswith(".current.json.")
    assert (new, old, mode) == (b"new", b"old", 0o600)
    assert not temporary.exists()


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    target = tmp_path / "batch.json"
    write_atomically(target, b"old")

    def crash(*args: object) -> None:
        raise OSError(f"crash in {failing}")

    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(OSError, match=f"crash in {failing}"):
        write_atomically(target, b"new")
    monkeypatch.undo()

    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["batch.json"]


def test_the_directory_is_synced_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real_replace, real_fsync_dir = os.replace, files.fsync_dir

    def replace(src: str, dst: str) -> None:
        order.append("replace")
        real_replace(src, dst)

    def sync_dir(path: Path) -> None:
        order.append(f"fsync_dir {Path(path).name}")
        real_fsync_dir(path)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(files, "fsync_dir", sync_dir)
    write_atomically(tmp_path / "a", b"x")
    assert order == ["replace", f"fsync_dir {tmp_path.name}"]


def test_append_durably_appends_whole_lines_to_a_private_file(tmp_path: Path) -> None:
    segment = tmp_path / "0000000000000000.jsonl"
    append_durably(segment, b'{"n": 0}\n')
    append_durably(segment, b'{"n": 1}\n')
    assert segment.read_bytes() == b'{"n": 0}\n{"n": 1}\n'
    assert _mode(segment) == 0o600


def test_symlink_atomically_switches_a_link_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    current = tmp_path / "current"

    symlink_atomically(current, "1")
    assert current.readlink() == Path("1")
    symlink_atomically(current, "2")  # over an existing link
    assert current.readlink() == Path("2")
    (tmp_path / ".current.tmp").symlink_to("1")  # left by a crash mid-switch
    symlink_atomically(current, "1")
    assert current.readlink() == Path("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "current"]


def test_move_into_place_and_the_syncs(tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.write_bytes(b"blob")
    fsync_file(partial)
    move_into_place(partial, tmp_path / "blob")
    fsync_dir(tmp_path)
    assert (tmp_path / "blob").read_bytes() == b"blob"
    assert not partial.exists()
