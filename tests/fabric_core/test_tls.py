"""`fabric_core.tls`: the manager's CA made once and kept, server certificates for the configured names,
the CA hash agents pin, join tokens, and client contexts that trust exactly the given CAs."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509

from fabric_core.settings import Settings
from fabric_core.tls import (
    ManagerCA,
    TlsError,
    ca_hash,
    client_context,
    join_token,
    manager_tls,
    parse_ca_hash,
    prepare_next_ca,
    promote_next_ca,
    server_context,
    split_certificates,
    split_join_token,
)


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> bytes:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        connection, _ = listener.accept()
        try:
            with server.wrap_socket(connection, server_side=True) as tls:
                tls.sendall(b"hello")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(
            socket.create_connection(("127.0.0.1", port)), server_hostname=hostname
        ) as tls:
            return tls.recv(5)
    finally:
        thread.join(5)
        listener.close()


def test_the_ca_is_made_at_first_start_with_a_private_key_and_kept(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = manager_tls(settings)

    assert stat.S_IMODE((settings.tls_dir / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(first.files.keyfile.stat().st_mode) == 0o600
    again = manager_tls(settings)
    assert again.ca_hash == first.ca_hash
    assert again.files.certfile.read_bytes() == first.files.certfile.read_bytes()  # not issued again


def test_processes_starting_at_once_share_one_ca(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        hashes = set(pool.map(lambda _: ManagerCA.load_or_create(tmp_path / "tls").hash, range(8)))
    assert len(hashes) == 1


def test_the_api_certificate_carries_the_configured_names_and_verifies_against_the_ca(tmp_path: Path) -> None:
    tls = manager_tls(Settings(data_dir=tmp_path, tls_names="manager.example, 10.0.0.7"))
    certificate = x509.load_pem_x509_certificate(tls.files.certfile.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["manager.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]

    assert handshake(server_context(tls.files), client_context(tls.trust_pem), "manager.example") == b"hello"
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(server_context(tls.files), client_context(tls.trust_pem), "other.example")


def test_new_names_issue_a_new_certificate(tmp_path: Path) -> None:
    before = manager_tls(Settings(data_dir=tmp_path)).files.certfile.read_bytes()
    after = manager_tls(Settings(data_dir=tmp_path, tls_names="manager.example")).files.certfile.read_bytes()
    assert before != after


def test_a_client_trusts_only_the_cas_it_is_given(tmp_path: Path) -> None:
    tls = manager_tls(Settings(data_dir=tmp_path))
    stranger = ManagerCA.generate()
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(server_context(tls.files), client_context(stranger.certificate_pem), "localhost")
    both = stranger.certificate_pem + tls.trust_pem  # a bundle, as during a CA rotation
    assert handshake(server_context(tls.files), client_context(both), "localhost") == b"hello"
    assert len(split_certificates(both)) == 2


def test_operator_certificates_come_in_threes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="all three"):
        Settings(data_dir=tmp_path, tls_cert_file=tmp_path / "c.pem")


def test_the_operators_own_certificate_is_served_and_its_ca_pinned(tmp_path: Path) -> None:
    theirs = ManagerCA.generate("Operator CA")
    chain, key = theirs.issue(["manager.corp"])
    for name, data in (("c.pem", chain), ("k.pem", key), ("ca.pem", theirs.certificate_pem)):
        (tmp_path / name).write_bytes(data)
    settings = Settings(
        data_dir=tmp_path / "data",
        tls_cert_file=tmp_path / "c.pem",
        tls_key_file=tmp_path / "k.pem",
        tls_ca_file=tmp_path / "ca.pem",
    )
    tls = manager_tls(settings)
    assert tls.ca is None and tls.ca_hash == theirs.hash
    assert not settings.tls_dir.exists()  # no CA of its own
    assert handshake(server_context(tls.files), client_context(tls.trust_pem), "manager.corp") == b"hello"


def test_ca_hashes_and_join_tokens() -> None:
    ca = ManagerCA.generate()
    assert ca_hash(ca.certificate_pem) == ca.hash and ca.hash.startswith("sha256:") and len(ca.hash) == 71
    assert parse_ca_hash(ca.hash.upper().replace("SHA256", "sha256")) == ca.hash
    for bad in ("sha256:abc", "md5:" + "0" * 64, "", ca.hash + "0"):
        with pytest.raises(TlsError, match="sha256:<64 hex digits>"):
            parse_ca_hash(bad)
    joined = join_token("pcet_AbC-_9", ca.hash)
    assert split_join_token(joined) == ("pcet_AbC-_9", ca.hash)
    assert split_join_token("pcet_AbC-_9") == ("pcet_AbC-_9", None)
    with pytest.raises(TlsError):
        split_join_token("pcet_x.sha256:nothex")


def test_a_prepared_ca_issues_once_promoted_and_the_old_one_is_kept(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = manager_tls(settings)
    prepared = prepare_next_ca(settings)
    assert prepare_next_ca(settings).hash == prepared.hash  # made once
    assert manager_tls(settings).ca_hash == first.ca_hash  # it issues nothing yet

    old, new = promote_next_ca(settings)

    assert (old.hash, new.hash) == (first.ca_hash, prepared.hash)
    after = manager_tls(settings)
    assert after.ca_hash == prepared.hash
    certificate = x509.load_pem_x509_certificate(after.files.certfile.read_bytes())
    assert certificate.issuer == prepared.certificate.subject  # issued again, from the new CA
    kept = settings.tls_dir / "retired" / old.hash.removeprefix("sha256:")
    assert ca_hash((kept / "ca.pem").read_bytes()) == old.hash and (kept / "ca.key").exists()
    assert (
        handshake(server_context(after.files), client_context(new.certificate_pem), "localhost") == b"hello"
    )
    with pytest.raises(TlsError, match="no CA prepared"):
        promote_next_ca(settings)
