"""Input found from outside to answer 500: each class gets a clear 4xx on every endpoint it reaches.

Each test is parametrised over the endpoints the class affects, and checks with `World.refused` that
the answer says why and that nothing changed. The classes: integers beyond 64 bits, lone surrogates,
JSON nested too deep, content paths agents reject, loose types, regular expressions that backtrack,
names that differ only in Unicode normalisation or carry control characters.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from fabric_core.canonical import MAX_JSON_DEPTH
from tests.support.world import Id, World, build_world, expand, nested, send_refused

BIG = 2**63
"""One beyond the largest BIGINT."""
HEARTBEAT = "/agent/v1/heartbeat"
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def world(shared_client: TestClient) -> World:
    """One world per module and backend: every request here is refused, so it stays as built (each
    refusal checks that), and the later tests see what the earlier ones left, which is nothing."""
    return build_world(shared_client)


# --- 1. integers beyond 2**63 - 1 ---------------------------------------------------------------------

PATHS_WITH_IDS = [
    ("GET", "/groups/{big}", None),
    ("PATCH", "/groups/{big}", {"name": "x"}),
    ("DELETE", "/groups/{big}", None),
    ("GET", "/groups/{big}/locations", None),
    ("POST", "/groups/{big}/locations", {"name": "x"}),
    ("GET", "/groups/<root>/locations/{big}", None),
    ("PATCH", "/groups/<root>/locations/{big}", {"name": "x"}),
    ("DELETE", "/groups/<root>/locations/{big}", None),
    ("GET", "/groups/<root>/locations/{big}/effective", None),
    ("GET", "/groups/{big}/communication", None),
    ("PUT", "/groups/{big}/communication", {}),
    ("GET", "/groups/<root>/locations/{big}/communication", None),
    ("PUT", "/groups/<root>/locations/{big}/communication", {}),
    ("GET", "/policies/{big}", None),
    ("PUT", "/policies/{big}", {"body": {}}),
    ("DELETE", "/policies/{big}", None),
    ("PUT", "/groups/{big}/policies/firewall", {"policy_id": Id("firewall")}),
    ("DELETE", "/groups/{big}/policies/firewall", None),
    ("PUT", "/groups/<root>/locations/{big}/policies/firewall", {"policy_id": Id("firewall")}),
    ("DELETE", "/groups/<root>/locations/{big}/policies/firewall", None),
    ("POST", "/groups/{big}/enrollment-tokens", {}),
    ("POST", "/groups/{big}/update-now", None),
    ("GET", "/groups/{big}/logs", None),
    ("GET", "/content/definitions/revisions/{big}", None),
]


@pytest.mark.parametrize(
    ("method", "path", "body"), PATHS_WITH_IDS, ids=[f"{m} {p}" for m, p, _ in PATHS_WITH_IDS]
)
def test_an_id_beyond_64_bits_in_a_path_is_422(world, method, path, body):
    detail = send_refused(world, method, "/api/v1" + path.replace("{big}", str(BIG)), body)
    assert "less than or equal to" in detail


def test_a_revision_beyond_64_bits_is_422_on_the_agent_api(world):
    send_refused(world, "GET", f"/agent/v1/content/definitions/{BIG}")


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/v1/agents", {"offset": BIG}),
        ("/api/v1/agents", {"group_id": BIG}),
        ("/api/v1/agents", {"limit": BIG}),
        ("/api/v1/agents/<agent>/logs", {"offset": BIG}),
        ("/api/v1/groups/<root>/logs", {"offset": BIG}),
        ("/agent/v1/config", {"location_id": BIG}),
        ("/agent/v1/config", {"location_id": -BIG - 1}),
    ],
)
def test_an_integer_beyond_64_bits_in_a_query_is_422(world, path, params):
    send_refused(world, "GET", path, params=params)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/groups", {"name": "x", "parent_id": BIG}),
        ("PATCH", "/api/v1/groups/<sales>", {"parent_id": BIG}),
        ("PUT", "/api/v1/groups/<root>/policies/firewall", {"policy_id": BIG}),
        ("PUT", "/api/v1/groups/<root>/locations/<office>/policies/firewall", {"policy_id": BIG}),
        ("PATCH", "/api/v1/agents/<agent>", {"group_id": BIG}),
        ("POST", "/api/v1/groups/<root>/enrollment-tokens", {"max_uses": BIG}),
        ("POST", "/api/v1/groups/<root>/enrollment-tokens", {"max_uses": 2**31}),  # an INTEGER column
        ("POST", "/api/v1/groups/<root>/enrollment-tokens", {"expires_in_s": BIG}),
        ("PUT", "/api/v1/groups/<root>/communication", {"heartbeat_s": BIG}),
        ("PUT", "/api/v1/groups/<root>/communication", {"randomize_s": BIG}),
        ("PUT", "/api/v1/groups/<root>/locations/<office>/communication", {"heartbeat_s": BIG}),
        (
            "POST",
            "/api/v1/groups/<root>/locations",
            {"name": "x", "conditions": [{"type": "ip_range", "cidr": "10.0.0.0/8", "weight": BIG}]},
        ),
        ("POST", HEARTBEAT, {"serial": BIG, "mode": "pull"}),
        ("POST", HEARTBEAT, {"serial": 0, "mode": "pull", "location_id": BIG}),
        ("POST", HEARTBEAT, {"serial": 0, "mode": "pull", "location_id": -BIG - 1}),
    ],
)
def test_an_integer_beyond_its_column_in_a_body_is_422(world, method, path, body):
    send_refused(world, method, path, body)


# --- 2. lone surrogates (and NUL) ---------------------------------------------------------------------

SURROGATE = '"\\ud800"'
"""A JSON string holding a lone surrogate, as the raw bytes a client sends."""
WITH_SURROGATE = [
    ("POST", "/api/v1/groups", '{"name": %s, "parent_id": <root>}'),
    ("PATCH", "/api/v1/groups/<sales>", '{"name": %s}'),
    ("POST", "/api/v1/groups/<root>/locations", '{"name": %s}'),
    ("PATCH", "/api/v1/groups/<root>/locations/<office>", '{"name": %s}'),
    (
        "POST",
        "/api/v1/groups/<root>/locations",
        '{"name": "x", "conditions": [{"type": "fact", "name": "os", "equals": %s}]}',
    ),
    ("POST", "/api/v1/policies", '{"name": %s, "type": "firewall", "body": {}}'),
    ("POST", "/api/v1/policies", '{"name": "p", "type": "firewall", "body": {"rule": %s}}'),
    ("PUT", "/api/v1/policies/<firewall>", '{"body": {%s: 1}}'),
    ("POST", "/api/v1/content/definitions/revisions", '{"files": [{"path": %s, "sha256": "%s"}]}'),
    ("POST", "/agent/v1/enroll", '{"token": %s, "hostname": "h"}'),
    ("POST", "/agent/v1/enroll", '{"token": "pcet_x", "hostname": %s}'),
    ("POST", "/agent/v1/enroll", '{"token": "pcet_x", "hostname": "h", "facts": {"os": %s}}'),
    ("POST", HEARTBEAT, '{"serial": 0, "mode": "pull", "status": {"s": %s}}'),
    (
        "POST",
        HEARTBEAT,
        '{"serial": 0, "mode": "pull", "logs": {"batch_id": "b", "entries": '
        '[{"ts": "2024-05-01T08:00:00Z", "message": %s}]}}',
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "template"), WITH_SURROGATE, ids=[f"{m} {p}" for m, p, _ in WITH_SURROGATE]
)
@pytest.mark.parametrize("content_type", ["application/json", None], ids=["json", "no-content-type"])
def test_a_lone_surrogate_in_any_string_is_422_with_a_reason(world, method, path, template, content_type):
    text = template.replace("%s", SURROGATE, 1).replace("%s", "0" * 64)
    headers = {"Content-Type": content_type} if content_type else {}
    detail = send_refused(world, method, path, content=expand(world, text).encode(), headers=headers)
    assert "surrogate" in detail


def test_a_validation_error_never_echoes_the_input_and_always_encodes(world):
    """FastAPI's own handler crashed echoing a surrogate; this one answers what was refused, not with what."""
    response = world.client.post(
        "/api/v1/groups",
        json={"name": "x", "parent_id": "secret-in-the-wrong-field"},
        headers=world.admin.headers,
    )
    assert response.status_code == 422
    assert "secret-in-the-wrong-field" not in response.text
    assert response.json()["errors"] == [
        {"loc": ["body", "parent_id"], "msg": "Input should be a valid integer", "type": "int_type"}
    ]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        (
            "POST",
            "/api/v1/groups/<root>/locations",
            {"name": "x", "conditions": [{"type": "fact", "name": "a\x00"}]},
        ),
        ("POST", "/agent/v1/enroll", {"token": "pcet_\x00", "hostname": "h"}),
        (
            "POST",
            "/api/v1/groups/<root>/locations",
            {"name": "x", "conditions": [{"type": "fact", "name": "os", "matches": "a\x00"}]},
        ),
    ],
)
def test_nul_in_any_text_field_is_422(world, method, path, body):
    assert "NUL" in json.dumps(send_refused(world, method, path, body))


# --- 3. JSON nested too deep --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        (
            "POST",
            "/api/v1/policies",
            {"name": "deep", "type": "firewall", "body": nested(MAX_JSON_DEPTH + 1)},
        ),
        ("POST", "/api/v1/policies", {"name": "deep", "type": "firewall", "body": nested(250)}),
        ("PUT", "/api/v1/policies/<firewall>", {"body": nested(MAX_JSON_DEPTH + 1)}),
        ("POST", HEARTBEAT, {"serial": 0, "mode": "pull", "status": nested(MAX_JSON_DEPTH + 1)}),
        (
            "POST",
            HEARTBEAT,
            {
                "serial": 0,
                "mode": "pull",
                "logs": {
                    "batch_id": "b",
                    "entries": [
                        {"ts": "2024-05-01T08:00:00Z", "message": "m", "data": nested(MAX_JSON_DEPTH + 1)}
                    ],
                },
            },
        ),
        (
            "POST",
            "/agent/v1/enroll",
            {"token": "pcet_x", "hostname": "h", "facts": nested(MAX_JSON_DEPTH + 1)},
        ),
    ],
    ids=["policy", "policy-250", "policy-update", "status", "log-data", "facts"],
)
def test_json_nested_beyond_the_limit_is_422(world, method, path, body):
    if path == "/agent/v1/enroll":
        body = {**body, "token": world.admin.enrollment_token(world.sales)}
    assert f"at most {MAX_JSON_DEPTH} deep" in send_refused(world, method, path, body)


def test_json_nested_beyond_what_any_parser_takes_is_422(world):
    deep = b'{"name": "p", "type": "firewall", "body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "deep" in world.refused("POST", "/policies", 422, content=deep, headers=JSON_HEADERS)


# --- 4. content paths ---------------------------------------------------------------------------------

BAD_PATHS = [
    ["./a"],
    ["a/./b"],
    ["a//b"],
    ["a/"],
    ["a\\b"],
    ["a\x00b"],
    ["a\nb"],
    ["../a"],
    ["/a"],
    ["a", "a/b"],
    ["a/b", "a"],
    ["x" * 513],
]


@pytest.mark.parametrize("paths", BAD_PATHS, ids=[repr(p)[:20] for p in BAD_PATHS])
def test_a_content_path_agents_would_reject_is_refused_by_the_manager(world, paths):
    digest = world.admin.upload(b"one")
    files = [{"path": path, "sha256": digest} for path in paths]
    send_refused(world, "POST", "/api/v1/content/definitions/revisions", {"files": files})


# --- 5. types as strict on the route as on the fast path ---------------------------------------------

LOOSE = [
    ("PUT", "/api/v1/groups/<root>/communication", {"heartbeat_s": "300"}),
    ("PUT", "/api/v1/groups/<root>/communication", {"heartbeat_s": True}),
    ("PUT", "/api/v1/groups/<root>/communication", {"heartbeat_s": 300.0}),
    ("PUT", "/api/v1/groups/<root>/communication", {"download_enabled": "true"}),
    ("PUT", "/api/v1/groups/<root>/communication", {"download_enabled": 1}),
    ("PUT", "/api/v1/groups/<root>/locations/<office>/communication", {"use_group_settings": 0}),
    ("POST", "/api/v1/groups", {"name": "x", "parent_id": True}),
    ("POST", "/api/v1/groups", {"name": "x", "parent_id": "<root>"}),
    ("POST", "/api/v1/groups", {"name": "x", "parent_id": Id("root"), "inherit": "false"}),
    ("PATCH", "/api/v1/groups/<sales>", {"inherit": 0}),
    ("PUT", "/api/v1/groups/<root>/policies/firewall", {"policy_id": "<firewall>"}),
    ("PATCH", "/api/v1/agents/<agent>", {"group_id": "<root>"}),
    ("POST", "/api/v1/groups/<root>/enrollment-tokens", {"max_uses": "1"}),
    (
        "POST",
        "/api/v1/groups/<root>/locations",
        {"name": "x", "conditions": [{"type": "ip_range", "cidr": "10.0.0.0/8", "weight": "5"}]},
    ),
    ("POST", HEARTBEAT, {"serial": "1", "mode": "pull"}),
    ("POST", HEARTBEAT, {"serial": True, "mode": "pull"}),
    ("POST", HEARTBEAT, {"serial": 0, "mode": "pull", "location_id": "1"}),
    ("POST", "/agent/v1/enroll", {"token": "pcet_x", "hostname": 5}),
]


@pytest.mark.parametrize(("method", "path", "body"), LOOSE, ids=[f"{m} {p} {list(b)}" for m, p, b in LOOSE])
def test_loose_types_are_422_on_the_full_route(world, method, path, body):
    send_refused(world, method, path, body)


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_moment_with_no_utc_equivalent_is_422(world, moment):
    entry = {"ts": moment, "message": "m"}
    send_refused(
        world, "POST", HEARTBEAT, {"serial": 0, "mode": "pull", "logs": {"batch_id": "b", "entries": [entry]}}
    )
    send_refused(world, "GET", "/api/v1/agents/<agent>/logs", params={"since": moment})


# --- 6. regular expressions: RE2, linear time ---------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", "RE2"),
        (r"(?=a)b", "RE2"),
        ("(", "missing )"),
        ("a" * 1025, "1024"),
        ("x{1000}{1000}", "RE2"),
    ],
    ids=["backreference", "lookahead", "unbalanced", "too-long", "repetition"],
)
def test_a_pattern_re2_refuses_is_422_saying_why(world, pattern, reason):
    condition = {"type": "fact", "name": "hostname", "matches": pattern}
    for method, path in (
        ("POST", "/api/v1/groups/<root>/locations"),
        ("PATCH", "/api/v1/groups/<root>/locations/<office>"),
    ):
        detail = send_refused(world, method, path, {"name": "Lab", "conditions": [condition]})
        assert reason in detail


# --- 7. names: NFC before the uniqueness check, no control characters ---------------------------------

DECOMPOSED, COMPOSED = "Cafe\u0301", "Caf\u00e9"


CONTROL = ["a\nb", "a\tb", "a\x1b[31mb", "a\x7fb", "a\u0085b"]


@pytest.mark.parametrize("name", CONTROL, ids=["newline", "tab", "escape", "delete", "nel"])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/groups", {"parent_id": Id("root")}),
        ("PATCH", "/api/v1/groups/<sales>", {}),
        ("POST", "/api/v1/groups/<root>/locations", {}),
        ("PATCH", "/api/v1/groups/<root>/locations/<office>", {}),
        ("POST", "/api/v1/policies", {"type": "x", "body": {}}),
        ("PUT", "/api/v1/policies/<firewall>", {"body": {}}),
    ],
    ids=["group", "group-rename", "location", "location-rename", "policy", "policy-rename"],
)
def test_control_characters_in_names_are_422(world, name, method, path, body):
    assert "control characters" in send_refused(world, method, path, {**body, "name": name})


@pytest.mark.parametrize("hostname", CONTROL, ids=["newline", "tab", "escape", "delete", "nel"])
def test_control_characters_in_hostnames_are_422(world, hostname):
    token = world.admin.enrollment_token(world.sales)
    send_refused(world, "POST", "/agent/v1/enroll", {"token": token, "hostname": hostname})
