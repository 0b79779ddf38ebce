"""ManagerClient: endpoints, auth header, bodies, and how failures map to ManagerError classes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from agent_stub import AGENT_VERSION
from agent_stub.errors import ManagerBadResponse, ManagerRejected, ManagerUnreachable
from agent_stub.manager_client import ManagerClient, normalize_server
from fabric_core.signing import SigningKey
from fabric_core.wire import HeartbeatRequest
from tests.agent_stub.conftest import make_doc

Handler = Callable[[httpx.Request], httpx.Response]


def _client(handler: Handler) -> ManagerClient:
    return ManagerClient.for_agent(
        server="http://manager.test/",
        agent_id="agent-1",
        secret="s3cret",
        timeout_s=1.0,
        transport=httpx.MockTransport(handler),
    )


async def _heartbeat(handler: Handler) -> Any:
    async with _client(handler) as client:
        return await client.heartbeat(HeartbeatRequest(serial=3, mode="pull", status={"hostname": "h"}))


def test_enroll_posts_the_request_and_parses_the_identity(signing_key: SigningKey) -> None:
    seen: list[httpx.Request] = []
    verify = signing_key.verify_key

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            201,
            json={
                "agent_id": "a-9",
                "secret": "x",
                "group_id": 4,
                "signing_key": {"kid": verify.kid, "public_key": verify.public_base64},
                "mqtt": {"url": "mqtt://b:1883", "username": "a-9", "password": "p"},
            },
        )

    response = asyncio.run(
        ManagerClient.enroll(
            server="http://manager.test/",
            token="tok",
            hostname="host-1",
            facts={"os": "Linux"},
            transport=httpx.MockTransport(handler),
        )
    )

    [request] = seen
    assert (request.method, str(request.url)) == ("POST", "http://manager.test/agent/v1/enroll")
    assert "authorization" not in request.headers
    assert request.headers["content-type"] == "application/json"
    assert orjson.loads(request.content) == {"token": "tok", "hostname": "host-1", "facts": {"os": "Linux"}}
    assert (response.agent_id, response.group_id, response.signing_key.kid) == ("a-9", 4, verify.kid)
    assert response.mqtt is not None and response.mqtt.username == "a-9"


def test_heartbeat_authenticates_and_omits_empty_fields(signing_key: SigningKey) -> None:
    seen: list[httpx.Request] = []
    envelope = orjson.loads(signing_key.sign_envelope(make_doc(serial=4)))

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"changed": True, "serial": 4, "next_heartbeat_s": 30, "config": envelope}
        )

    response = asyncio.run(_heartbeat(handler))

    [request] = seen
    assert (request.method, str(request.url)) == ("POST", "http://manager.test/agent/v1/heartbeat")
    assert request.headers["authorization"] == "Bearer s3cret"
    assert orjson.loads(request.content) == {"serial": 3, "mode": "pull", "status": {"hostname": "h"}}
    assert response.changed and response.next_heartbeat_s == 30
    assert response.config is not None and response.config.model_dump() == envelope


def test_heartbeat_sends_only_the_headers_the_manager_needs() -> None:
    """Host, Content-Length, Authorization, Content-Type: nothing else (benchmark 3's bytes), while the
    agent's other requests keep saying who they are."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/heartbeat"):
            return httpx.Response(200, json={"changed": False, "serial": 3, "next_heartbeat_s": 30})
        return httpx.Response(200, content=b'{"doc":{}}', headers={"ETag": '"3"'})

    async def scenario() -> None:
        async with _client(handler) as client:
            await client.heartbeat(HeartbeatRequest(serial=3, mode="pull"))
            await client.get_config(None)

    asyncio.run(scenario())

    heartbeat, config = seen
    assert sorted(heartbeat.headers.keys()) == ["authorization", "content-length", "content-type", "host"]
    assert heartbeat.headers["content-type"] == "application/json"
    assert heartbeat.content == b'{"serial":3,"mode":"pull"}'  # no status: unchanged
    assert config.headers["user-agent"] == f"policycast-agent/{AGENT_VERSION}"
    assert config.headers["accept"] == "application/json"


def test_heartbeat_headers_on_a_real_socket() -> None:
    """The bytes httpx really writes (httpcore and h11 add nothing of their own), on a shared client
    whose own defaults stay as they were for its other requests."""
    received: list[bytes] = []
    answer = b'{"changed":false,"serial":3,"next_heartbeat_s":30}'

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        received.append(head + await reader.readexactly(length))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(answer)
        )
        writer.write(answer)
        await writer.drain()
        writer.close()

    async def scenario() -> httpx.Headers:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, httpx.AsyncClient() as http:
            client = ManagerClient(
                server=f"http://127.0.0.1:{port}", agent_id="a", secret="s3cret", http=http
            )
            reply = await client.heartbeat(HeartbeatRequest(serial=3, mode="pull", status={"hostname": "h"}))
            assert not reply.changed
            return http.headers

    defaults = asyncio.run(scenario())

    [raw] = received
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /agent/v1/heartbeat HTTP/1.1"
    assert sorted(line.split(b":", 1)[0].lower() for line in lines[1:]) == [
        b"authorization",
        b"content-length",
        b"content-type",
        b"host",
    ]
    assert b"Authorization: Bearer s3cret" in lines
    assert body == b'{"serial":3,"mode":"pull","status":{"hostname":"h"}}'
    assert {"accept", "accept-encoding", "connection", "user-agent"} <= set(defaults)  # not the client's


def test_get_config_sends_the_etag_and_maps_304_to_none() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers.get("if-none-match") == '"7"':
            return httpx.Response(304)
        return httpx.Response(200, content=b'{"doc":{}}', headers={"ETag": '"7"'})

    async def scenario() -> tuple[Any, Any]:
        async with _client(handler) as client:
            first = await client.get_config(None)
            second = await client.get_config(first[1], location_id=4)
        return first, second

    first, second = asyncio.run(scenario())

    assert first == (b'{"doc":{}}', '"7"')
    assert second == (None, '"7"')
    assert [str(r.url) for r in seen] == [
        "http://manager.test/agent/v1/config",
        "http://manager.test/agent/v1/config?location_id=4",
    ]
    assert "if-none-match" not in seen[0].headers
    assert all(r.headers["authorization"] == "Bearer s3cret" for r in seen)


def _raise(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


@pytest.mark.parametrize(
    "handler",
    [
        _raise(httpx.ConnectError("refused")),
        _raise(httpx.ReadTimeout("slow")),
        _raise(httpx.RemoteProtocolError("dropped")),
        lambda request: httpx.Response(503, text="down"),
        lambda request: httpx.Response(500, json={"detail": "bug"}),
    ],
    ids=["connect", "timeout", "dropped", "503", "500"],
)
def test_transient_failures_are_unreachable(handler: Handler) -> None:
    with pytest.raises(ManagerUnreachable):
        asyncio.run(_heartbeat(handler))


@pytest.mark.parametrize(
    ("response", "detail"),
    [
        (httpx.Response(401, json={"detail": "unknown agent"}), "unknown agent"),
        (httpx.Response(403, json={"detail": "revoked"}), "revoked"),
        (httpx.Response(422, json={"detail": [{"loc": ["body"], "msg": "bad"}]}), '"msg":"bad"'),
        (httpx.Response(400, text="plain text"), "plain text"),
    ],
)
def test_4xx_is_rejected_with_status_and_detail(response: httpx.Response, detail: str) -> None:
    with pytest.raises(ManagerRejected) as caught:
        asyncio.run(_heartbeat(lambda request: response))
    assert caught.value.status == response.status_code
    assert detail in caught.value.detail
    assert caught.value.unauthorized == (response.status_code in (401, 403))
    assert not isinstance(caught.value, ManagerUnreachable)


@pytest.mark.parametrize("body", [b"not json", b'{"changed": true}', b"[]"])
def test_a_2xx_breaking_the_contract_is_a_bad_response(body: bytes) -> None:
    with pytest.raises(ManagerBadResponse):
        asyncio.run(_heartbeat(lambda request: httpx.Response(200, content=body)))


def test_enroll_refused_is_rejected() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(403, json={"detail": "token expired"}))
    with pytest.raises(ManagerRejected, match="token expired"):
        asyncio.run(
            ManagerClient.enroll(
                server="http://m.test", token="t", hostname="h", facts={}, transport=transport
            )
        )


def test_shared_http_client_is_not_closed_by_an_agent() -> None:
    async def scenario() -> bool:
        async with httpx.AsyncClient() as http:
            client = ManagerClient(server="http://m.test", agent_id="a", secret="s", http=http)
            await client.aclose()
            return http.is_closed

    assert asyncio.run(scenario()) is False


@pytest.mark.parametrize(
    ("given", "expected"),
    [("http://m:8000/", "http://m:8000"), (" https://m.example ", "https://m.example")],
)
def test_normalize_server(given: str, expected: str) -> None:
    assert normalize_server(given) == expected


@pytest.mark.parametrize("given", ["m:8000", "ftp://m", "", "http://"])
def test_normalize_server_refuses_non_http(given: str) -> None:
    with pytest.raises(ValueError, match="http"):
        normalize_server(given)
