"""Benchmark 2's harness, small: a few hundred heartbeats and baseline requests, every answer checked.

A smoke test of the harness (real `policycast serve` and uvicorn processes, the benchmark's own load
client), asserting correctness only, never a time: the machines that run the suite are shared.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import ssl
from pathlib import Path

import pytest

from bench import heartbeat_throughput as bench
from bench.cold_client import run_cold_load
from bench.heartbeat_requests import (
    HEARTBEAT_PATH,
    baseline_validator,
    heartbeat_body,
    http_request,
    request_headers,
)
from bench.load_client import LoadResult, run_load
from bench.servers import BenchTls, baseline_server, running
from bench.wrk_client import WRK_SAMPLE, run_wrk

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("plain_http", [False, True], ids=["https", "plain-http"])
def test_a_small_benchmark_2_answers_every_heartbeat_right(plain_http: bool):
    args = argparse.Namespace(
        workers=[1],
        connections=8,
        heartbeat_agents=24,
        requests=300,
        rounds=1,
        no_asgi_floor=True,
        quick=True,
        plain_http=plain_http,
        no_cold=True,  # the cold phase has its own test below
    )

    result = bench.run(args)

    assert result["name"] == bench.NAME == "heartbeat_throughput"
    run = result["by_workers"]["1"]
    for side in ("baseline", "heartbeat"):
        assert run[side]["errors"] == 0, run[side]["first_error"]
        assert run[side]["requests_checked"] >= 300
        assert run[side]["bytes_out_per_request"] > 0
    assert result["errors"] == 0
    assert run["ratio"] is not None and run["ratio"] > 0
    assert result["summary"]["agents_per_core_at_5min"] > 0
    assert result["machine"]["cores"]
    # the result says how it was served, and the manager and its baseline spoke the same TLS
    assert result["config"]["tls"] is (not plain_http)
    assert result["summary"]["transport"] == ("http" if plain_http else "https")
    if plain_http:
        assert run["tls"] == {"manager": None, "baseline": None}
    else:
        assert run["tls"]["manager"] == run["tls"]["baseline"]
        assert run["tls"]["manager"]["version"] in {"TLSv1.2", "TLSv1.3"}
        assert run["tls"]["manager"]["certificate_key"] == "secp256r1"


def test_over_tls_the_baseline_is_trusted_through_the_run_ca_only(tmp_path: Path):
    """The load client verifies the baseline's certificate against the run's CA, and checks every
    answer over TLS as over plain HTTP."""
    tls = BenchTls(tmp_path / "ca")
    server = baseline_server(tmp_path, 1, tls=tls)
    requests = [
        http_request("POST", HEARTBEAT_PATH, heartbeat_body(7, 1, i), request_headers(server.port, "s"))
        for i in range(4)
    ]
    stranger = BenchTls(tmp_path / "another-ca").client
    with running(server):
        right = asyncio.run(
            run_load(
                "127.0.0.1", server.port, [requests], baseline_validator(7), total=50, ssl_context=tls.client
            )
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            asyncio.run(
                run_load(
                    "127.0.0.1", server.port, [requests], baseline_validator(7), total=5, ssl_context=stranger
                )
            )

    assert (right.requests, right.errors) == (50, 0)
    assert right.bytes_out_per_request > 0


def test_the_harness_counts_wrong_answers(tmp_path: Path):
    """The check is not vacuous: answers for another serial are all counted as errors."""
    server = baseline_server(tmp_path, 1)
    requests = [
        http_request("POST", HEARTBEAT_PATH, heartbeat_body(7, 1, i), request_headers(server.port, "s"))
        for i in range(4)
    ]
    with running(server):
        right = asyncio.run(run_load("127.0.0.1", server.port, [requests], baseline_validator(7), total=50))
        wrong = asyncio.run(run_load("127.0.0.1", server.port, [requests], baseline_validator(8), total=50))

    assert (right.requests, right.errors) == (50, 0)
    assert (wrong.requests, wrong.errors) == (50, 50)
    assert "200" in (wrong.first_error or "")


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (make wrk)")
def test_the_wrk_client_counts_refusals_and_checks_a_sample(tmp_path: Path):
    server = baseline_server(tmp_path, 1)
    headers = request_headers(server.port, "secret")

    def requests(body: bytes) -> list[list[bytes]]:
        return [[http_request("POST", HEARTBEAT_PATH, body, headers)] for _ in range(4)]

    good, refused = requests(heartbeat_body(7, 1, 0)), requests(b'{"serial": -1, "mode": "pull"}')
    with running(server):

        def load(requests: list[list[bytes]], serial: int) -> LoadResult:
            check = baseline_validator(serial)
            return asyncio.run(run_wrk("127.0.0.1", server.port, requests, check, duration=1, warmup=0))

        right, wrong, refusals = load(good, 7), load(good, 8), load(refused, 7)

    assert right.requests > 0 and right.errors == 0 and right.bodies_checked >= WRK_SAMPLE
    assert wrong.errors >= WRK_SAMPLE, "the sample's bodies are checked"
    assert refusals.errors >= refusals.requests, "every 422 counts"


def test_the_cold_phase_answers_every_heartbeat_right_each_on_a_new_connection():
    """Benchmark 2's cold phase: over TLS and over plain HTTP, the manager and its baseline, every
    heartbeat on a connection (and over TLS a full handshake) of its own, every answer checked."""
    args = argparse.Namespace(
        workers=[1],
        connections=4,
        heartbeat_agents=12,
        requests=120,
        rounds=1,
        no_asgi_floor=True,
        quick=True,
        cold_processes=2,
        cold_concurrency=4,
    )

    result = bench.run(args)

    assert result["errors"] == 0
    cold = result["cold_1w"]
    assert set(cold) == {"https", "http"}
    for transport, run in cold.items():
        for side in ("baseline", "heartbeat"):
            measured = run[side]
            assert measured["errors"] == 0, measured["first_error"]
            assert measured["requests_checked"] == 120
            # a new connection per heartbeat: as many connections, local ports and (TLS) full handshakes
            assert measured["connections"] == measured["distinct_local_ports"] == 120
            assert measured["tls_sessions_resumed"] == 0
            assert measured["tls"] is (transport == "https")
            assert measured["client_processes"] == 2
        if transport == "https":
            assert run["tls"]["manager"] == run["tls"]["baseline"]
            assert run["tls"]["manager"]["certificate_key"] == "secp256r1"
        else:
            assert run["tls"] == {"manager": None, "baseline": None}
    summary = result["summary"]
    assert summary["cold_tls_heartbeat_rps_per_core"] > 0
    assert summary["cold_plain_heartbeat_rps_per_core"] > 0
    assert summary["cold_tls_agents_per_core_at_5min"] > 0


def test_the_cold_client_counts_wrong_answers_and_trusts_only_the_run_ca(tmp_path: Path):
    tls = BenchTls(tmp_path / "ca")
    server = baseline_server(tmp_path, 1, tls=tls)
    requests = [
        http_request("POST", HEARTBEAT_PATH, heartbeat_body(7, 1, i), request_headers(server.port, "s"))
        for i in range(4)
    ]
    stranger = BenchTls(tmp_path / "another-ca").ca.certificate_pem

    def load(serial: int, ca_pem: bytes) -> LoadResult:
        return run_cold_load(
            "127.0.0.1",
            server.port,
            requests,
            baseline_validator(serial),
            ca_pem=ca_pem,
            processes=1,
            concurrency=2,
            total=20,
        )

    with running(server):
        right, wrong, untrusted = (
            load(7, tls.ca.certificate_pem),
            load(8, tls.ca.certificate_pem),
            load(7, stranger),
        )

    assert (right.requests, right.errors) == (20, 0)
    assert (wrong.requests, wrong.errors) == (20, 20)
    assert "200" in (wrong.first_error or "")
    assert untrusted.requests == 0 and untrusted.errors >= 1
    assert "CERTIFICATE_VERIFY_FAILED" in (untrusted.first_error or "")
