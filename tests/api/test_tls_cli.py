"""`policycast admin tls`: a CA rotation from the command line, on the manager's data directory and
database, and its refusals as one line with exit 1 (never a traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from api.fabric import open_fabric
from api.services import trust
from fabric_core.settings import Settings
from fabric_core.tls import ManagerCA, ca_hash
from local_stack.cli import app
from manager_db.database import make_engine

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A manager's data directory after its first start (signing key, CA, database)."""
    directory = tmp_path / "data"
    monkeypatch.setenv("POLICYCAST_DATA_DIR", str(directory))
    open_fabric(Settings(data_dir=directory)).engine.dispose()
    return directory


def _trusted(data_dir: Path) -> list[str]:
    engine = make_engine(Settings(data_dir=data_dir).resolved_database_url)
    try:
        with Session(engine) as session:
            return [row.sha256 for row in trust.trusted(session)]
    finally:
        engine.dispose()


def _tls(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["admin", "tls", *args])
    return result.exit_code, result.output


def test_a_rotation_from_the_command_line(data_dir: Path) -> None:
    old = ManagerCA.load_or_create(data_dir / "tls").hash
    assert _trusted(data_dir) == [old]

    code, out = _tls("prepare-ca")
    assert code == 0, out
    new = ca_hash((data_dir / "tls" / "next" / "ca.pem").read_bytes())
    assert _trusted(data_dir) == [old, new]

    code, out = _tls("promote-ca")
    assert code == 0, out
    assert ManagerCA.load_or_create(data_dir / "tls").hash == new
    assert (data_dir / "tls" / "retired" / old.removeprefix("sha256:") / "ca.pem").exists()

    code, out = _tls("list")
    assert code == 0 and new in out and old in out
    issuing = [line for line in out.splitlines() if "issues the servers' certificates" in line]
    assert len(issuing) == 1 and new in issuing[0]  # the promoted CA issues now

    code, out = _tls("retire-ca", old)
    assert code == 0, out
    assert _trusted(data_dir) == [new]


@pytest.mark.parametrize(
    ("argument", "why"),
    [
        ("md5:abc", "a CA hash looks like sha256:<64 hex digits>"),
        (f"sha256:{'0' * 64}", "no trusted CA"),
        (None, "the only trusted CA"),
    ],
)
def test_retiring_what_cannot_go_is_one_line_and_changes_nothing(
    data_dir: Path, argument: str | None, why: str
) -> None:
    before = _trusted(data_dir)
    code, out = _tls("retire-ca", argument or before[0])
    assert code == 1
    assert why in out and "Traceback" not in out
    assert out.startswith("error: retiring the CA: ")
    assert _trusted(data_dir) == before


def test_promoting_without_a_prepared_ca_is_refused(data_dir: Path) -> None:
    code, out = _tls("promote-ca")
    assert code == 1 and "prepare one first" in out


def test_trusting_what_is_not_one_certificate_is_refused(data_dir: Path, tmp_path: Path) -> None:
    before = _trusted(data_dir)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    code, out = _tls("trust-ca", str(junk))
    assert code == 1 and "exactly one PEM certificate" in out
    assert _trusted(data_dir) == before
