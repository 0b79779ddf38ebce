"""The console's Logs page, in-process: what agents uploaded, newest first, with the host that sent it,
filtered by group, client (host name or agent id), level, category and time, paged with Previous and
Next; every filter bounded and a refused one shown at its field. Read-only: there is nothing to write."""

from __future__ import annotations

import re
from html import unescape
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.clients import ADMIN_KEY, Admin, AgentClient
from tests.support.console import field_error, signed_in, write_controls


def viewer_key(admin: Admin) -> str:
    return str(admin.post("/api-keys", {"name": "auditor", "role": "viewer"})["key"])


def entry(ts: str, message: str, level: str = "info", **more: Any) -> dict[str, Any]:
    return {"ts": ts, "message": message, "level": level, **more}


def upload(agent: AgentClient, entries: list[dict[str, Any]]) -> None:
    agent.heartbeat(serial=0, logs={"batch_id": "b1", "entries": entries})


def shown(html: str) -> list[str]:
    """The messages in the log table, top to bottom."""
    table = html[html.index('aria-label="Log entries"') :]
    return [
        unescape(m).strip()
        for m in re.findall(r"<td>([^<]*?)\s*(?:<details>.*?</details>\s*)?</td>\s*</tr>", table, re.S)
    ]


@pytest.fixture
def fleet(admin: Admin, enroll: Any) -> dict[str, Any]:
    branch = admin.group("Branch", admin.root()["id"])
    laptop = enroll(group_id=branch["id"], hostname="laptop-7")
    server = enroll(hostname="server-1")
    upload(
        laptop,
        [
            entry("2024-05-01T08:00:00Z", "boot"),
            entry(
                "2024-05-01T10:00:00Z",
                "threat found",
                "security",
                category="antivirus",
                data={"file": "x.exe"},
            ),
            entry("2024-05-01T11:00:00Z", "update failed", "error", category="liveupdate"),
        ],
    )
    upload(server, [entry("2024-05-01T09:00:00Z", "scan started", category="antivirus")])
    return {"branch": branch, "laptop": laptop, "server": server}


@pytest.mark.parametrize("role", ["admin", "viewer"])
def test_the_page_shows_every_agents_logs_newest_first(
    client: TestClient, admin: Admin, fleet: dict[str, Any], role: str
) -> None:
    signed_in(client, ADMIN_KEY if role == "admin" else viewer_key(admin))

    page = client.get("/console/logs")

    assert page.status_code == 200
    assert 'href="/console/logs" aria-current="page"' in page.text
    assert shown(page.text) == ["update failed", "threat found", "scan started", "boot"]
    assert f'<td title="agent {fleet["laptop"].id}">laptop-7</td>' in page.text
    assert f'<td title="agent {fleet["server"].id}">server-1</td>' in page.text
    assert "<td>2024-05-01 10:00:00 UTC</td>" in page.text
    assert (
        "<details><summary>Data</summary><pre>{\n  &#34;file&#34;: &#34;x.exe&#34;\n}</pre></details>"
        in page.text
    )
    for label in (
        "Group",
        "Client (host name or agent id)",
        "Level",
        "Category",
        "Since (UTC)",
        "Until (UTC)",
    ):
        assert f">{label}</label>" in page.text
    assert write_controls(page.text) == []  # a filter form reads; nothing on the page writes


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"client": "laptop-7"}, ["update failed", "threat found", "boot"]),
        ({"level": "security"}, ["threat found"]),
        ({"category": "antivirus"}, ["threat found", "scan started"]),
        ({"since": "2024-05-01T09:00", "until": "2024-05-01T11:00"}, ["threat found", "scan started"]),
        ({"since": "2024-05-01T10:00:00"}, ["update failed", "threat found"]),
        ({"client": "laptop-7", "category": "antivirus"}, ["threat found"]),
        ({"client": "nobody"}, []),
    ],
)
def test_the_filters_narrow_the_logs(
    client: TestClient, fleet: dict[str, Any], filters: dict[str, str], expected: list[str]
) -> None:
    signed_in(client, ADMIN_KEY)

    page = client.get("/console/logs", params=filters)

    assert page.status_code == 200
    assert shown(page.text) == expected
    if not expected:
        assert "No log entries match." in page.text
    for name, value in filters.items():  # each filter is kept in its field
        kept = f'<option value="{value}" selected>' if name == "level" else f'value="{value}"'
        assert re.search(rf'<(input|select)[^>]*name="{name}"[^>]*>', page.text)
        assert kept in page.text


def test_the_group_and_agent_id_filters(client: TestClient, fleet: dict[str, Any]) -> None:
    signed_in(client, ADMIN_KEY)

    by_group = client.get("/console/logs", params={"group": fleet["branch"]["id"]})
    by_id = client.get("/console/logs", params={"client": fleet["server"].id})

    assert shown(by_group.text) == ["update failed", "threat found", "boot"]
    assert f'<option value="{fleet["branch"]["id"]}" selected>Branch</option>' in by_group.text
    assert shown(by_id.text) == ["scan started"]


def test_pages_go_back_and_forth_keeping_the_filters(client: TestClient, fleet: dict[str, Any]) -> None:
    signed_in(client, ADMIN_KEY)

    first = client.get("/console/logs", params={"limit": 25, "client": "laptop-7"})
    assert "Previous</a>" not in first.text and "Next</a>" not in first.text  # all on one page
    first = client.get("/console/logs", params={"limit": 2})
    assert shown(first.text) == ["update failed", "threat found"]
    assert "Previous</a>" not in first.text
    following = unescape(re.search(r'<a href="([^"]+)" rel="next">Next</a>', first.text).group(1))  # type: ignore[union-attr]
    assert following == "/console/logs?limit=2&offset=2"

    second = client.get(following)
    assert shown(second.text) == ["scan started", "boot"]
    assert "Entries 3 to 4" in second.text
    assert "Next</a>" not in second.text  # nothing after
    back = unescape(re.search(r'<a href="([^"]+)" rel="prev">Previous</a>', second.text).group(1))  # type: ignore[union-attr]
    assert shown(client.get(back).text) == ["update failed", "threat found"]

    filtered = client.get("/console/logs", params={"limit": 1, "category": "antivirus"})
    assert 'href="/console/logs?category=antivirus&amp;limit=1&amp;offset=1" rel="next"' in filtered.text


@pytest.mark.parametrize(
    ("filters", "field", "reason"),
    [
        ({"level": "loud"}, "log-level", "Level must be one of debug, info"),
        ({"since": "yesterday"}, "log-since", "Since must be a date and time"),
        ({"until": "2024-13-01T00:00"}, "log-until", "Until must be a date and time"),
        ({"since": "2024-05-02T00:00", "until": "2024-05-01T00:00"}, "log-until", "later than Since"),
        ({"since": "0001-01-01T00:00+01:00"}, "log-since", "Since must be a date and time"),
        ({"group": "abc"}, "log-group", "Group must be a whole number"),
        ({"group": str(2**64)}, "log-group", "Group must be a whole number"),
        ({"limit": "5000"}, "log-limit", "from 1 to 200"),
        ({"limit": "0"}, "log-limit", "from 1 to 200"),
        ({"client": "a\x00b"}, "log-client", "NUL"),
        ({"category": "x" * 65}, "log-category", "longer than 64"),
    ],
)
def test_a_refused_filter_is_shown_at_its_field_and_lists_nothing(
    client: TestClient, fleet: dict[str, Any], filters: dict[str, str], field: str, reason: str
) -> None:
    signed_in(client, ADMIN_KEY)

    page = client.get("/console/logs", params=filters)

    assert page.status_code == 422
    assert reason in (field_error(page.text, field) or "")
    assert shown(page.text) == [] and "Correct the filters above." in page.text


@pytest.mark.parametrize("offset", ["-1", str(2**70), "1e3"])
def test_an_impossible_offset_is_refused(client: TestClient, fleet: dict[str, Any], offset: str) -> None:
    signed_in(client, ADMIN_KEY)
    page = client.get("/console/logs", params={"offset": offset})
    assert page.status_code == 422
    assert 'id="log-offset-error" class="field-error" role="alert">Offset must be a whole number' in page.text


def test_nothing_is_written_from_the_logs_page(
    client: TestClient, admin: Admin, fleet: dict[str, Any]
) -> None:
    csrf = signed_in(client, ADMIN_KEY)
    assert client.post("/console/logs", data={"csrf_token": csrf}).status_code == 405
    assert len(admin.get(f"/agents/{fleet['laptop'].id}/logs")) == 3
