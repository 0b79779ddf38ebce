"""A throw-away Mosquitto for the agent's push tests: real broker, free local ports, this test's own pid.

TODO(tests/support/broker.py): switch these tests to the project's dynsec-enabled broker fixture once
it lands (agents then get real per-agent accounts and ACLs). This one is deliberately minimal: anonymous
clients on the main listener, with an ACL file only so that a refused publication can be tested, and a
second listener that refuses every connection, for CONNACK refusals.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

from fabric_core.settings import MqttAddress
from tests.support.processes import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
ALLOWED_PREFIX = "policycast/#"
"""What the ACL of the main listener lets anonymous clients read and write."""


class Mosquitto:
    """One broker process; `stop()` and `start()` again keep the same ports (for reconnect tests)."""

    def __init__(self, workdir: Path, *, tls: tuple[Path, Path] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.locked_port = free_port()
        self.tls = tls
        self.log_path = workdir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def address(self) -> MqttAddress:
        return MqttAddress("127.0.0.1", self.port, tls=self.tls is not None)

    @property
    def url(self) -> str:
        return self.address.url

    @property
    def locked_address(self) -> MqttAddress:
        return MqttAddress("127.0.0.1", self.locked_port)

    def _write_config(self) -> None:
        acl = self.workdir / "acl"
        # `topic` lines at the top serve anonymous clients, `pattern` lines every client (agents log in).
        acl.write_text(f"topic readwrite {ALLOWED_PREFIX}\npattern readwrite {ALLOWED_PREFIX}\n")
        lines = [
            "per_listener_settings true",
            "persistence false",
            "user root",  # stay the test's user when run as root: the files here are private to it
            f"log_dest file {self.log_path}",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"acl_file {acl}",
        ]
        if self.tls is not None:
            cert, key = self.tls
            lines += [f"certfile {cert}", f"keyfile {key}"]
        lines += [f"listener {self.locked_port} 127.0.0.1", "allow_anonymous false"]
        (self.workdir / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    def start(self) -> Mosquitto:
        assert self._process is None, "already running"
        self._process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.workdir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not self._listening():
            if self._process.poll() is not None:
                raise AssertionError(f"mosquitto exited:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"mosquitto did not listen on {self.port}:\n{self.output()}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop the broker (SIGTERM: it closes every connection)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
            return True
        return False

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def self_signed_certificate(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM files); clients trust it directly."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "policycast test broker")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / "broker.crt", workdir / "broker.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
