"""`fabric_core.console`: a failure an operator can act on is one line on stderr and a non-zero exit,
never a traceback; bad settings name the environment variable to fix."""

from __future__ import annotations

import pytest

from fabric_core.console import fail, load_settings
from fabric_core.settings import AgentSettings, Settings


def test_fail_prints_one_line_on_stderr_and_exits_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        fail("no signing key in /srv/policycast")

    assert exited.value.code == 1
    captured = capsys.readouterr()
    assert captured.err == "error: no signing key in /srv/policycast\n"
    assert captured.out == ""


def test_fail_exits_with_the_code_given(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        fail("the manager refused: 403", code=3)

    assert exited.value.code == 3
    assert capsys.readouterr().err == "error: the manager refused: 403\n"


def test_a_long_failure_is_still_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    message = "the manager refused: 422 " + "x" * 400  # e.g. a long answer body
    with pytest.raises(SystemExit):
        fail(message)

    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_failure_message_is_printed_as_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        fail("cannot reach mqtt://[::1]:1883 [errno 111]")

    assert capsys.readouterr().err == "error: cannot reach mqtt://[::1]:1883 [errno 111]\n"


def test_load_settings_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLICYCAST_HEARTBEAT_JITTER", "0.25")
    monkeypatch.setenv("POLICYCAST_AGENT_RETRY_MIN_S", "2.5")

    assert load_settings(Settings).heartbeat_jitter == 0.25
    assert load_settings(AgentSettings).retry_min_s == 2.5


@pytest.mark.parametrize(
    ("kind", "variable", "value"),
    [
        (Settings, "POLICYCAST_HEARTBEAT_JITTER", "a lot"),
        (AgentSettings, "POLICYCAST_AGENT_RETRY_MIN_S", "-1"),
    ],
)
def test_load_settings_names_the_bad_variable(
    kind: type[Settings] | type[AgentSettings],
    variable: str,
    value: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(SystemExit) as exited:
        load_settings(kind)

    assert exited.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: invalid {variable} setting: "), captured.err
    assert "Traceback" not in captured.err and "validation error" not in captured.err
    assert captured.out == ""
