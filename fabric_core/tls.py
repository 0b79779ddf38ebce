"""TLS: the manager's own CA, the server certificates it issues, the CA hash agents pin, and contexts.

Every channel is TLS (DESIGN.md section 7). At its first start the manager makes a CA in
`$POLICYCAST_DATA_DIR/tls/` (`ca.pem`, and `ca.key` beside it, 0600), unless the operator brings a
certificate, key and CA (`POLICYCAST_TLS_CERT_FILE`, `_KEY_FILE`, `_CA_FILE`). The api's and the
broker's server certificates are issued from the CA for the names the operator configures
(`POLICYCAST_TLS_NAMES`: DNS names and IP addresses).

Agents pin the CA at enrolment by its hash, `sha256:<hex of the DER certificate>` (as kubeadm's
discovery hash does), and from then on trust only the CAs the manager names: the pinned one, then the
bundle that signed documents carry, which is how a new CA reaches agents before the old one retires.

Keys are ECDSA P-256: small certificates and cheap handshakes for fleets that reconnect at once.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import os
import re
import ssl
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fabric_core.errors import ContractError
from fabric_core.settings import Settings

CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=397)
RENEW_BEFORE = datetime.timedelta(days=30)
"""A server certificate this close to its end is issued again at the next start."""
CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


class TlsError(ContractError):
    """A certificate, key or CA hash that cannot be used (unreadable, mismatched, malformed)."""


def ca_hash(certificate_pem: bytes) -> str:
    """`sha256:<hex>` of the DER bytes of the first certificate in `certificate_pem`."""
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError as exc:
        raise TlsError(f"not a PEM certificate: {exc}") from exc
    return "sha256:" + hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def parse_ca_hash(text: str) -> str:
    """A CA hash as given by an operator (`sha256:` and 64 hex digits, any case), normalised."""
    normal = text.strip().lower()
    if not _HASH.match(normal):
        raise TlsError(f"a CA hash looks like sha256:<64 hex digits>, not {text!r}")
    return normal


JOIN_SEPARATOR = "."
"""Between an enrolment token and the CA hash in a join token: `pcet_<secret>.sha256:<hex>` (a token's
secret is URL-safe base64, which holds no dot)."""


def join_token(token: str, ca: str) -> str:
    """One string that carries an enrolment token and the hash of the CA the agent must pin."""
    return f"{token}{JOIN_SEPARATOR}{parse_ca_hash(ca)}"


def split_join_token(text: str) -> tuple[str, str | None]:
    """(token, CA hash or None) of a join token or of a bare enrolment token."""
    token, separator, pinned = text.strip().rpartition(JOIN_SEPARATOR)
    if not separator or not pinned.startswith("sha256:"):
        return text.strip(), None
    return token, parse_ca_hash(pinned)


def split_certificates(bundle_pem: bytes) -> list[bytes]:
    """The PEM certificates of a bundle, one by one (anything between them is dropped)."""
    found = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", bundle_pem, re.S)
    return [block.strip() + b"\n" for block in found]


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_names(names: Iterable[str]) -> tuple[list[str], list[IpAddress]]:
    """DNS names and IP addresses for a certificate's subject alternative names."""
    dns: list[str] = []
    ips: list[IpAddress] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        try:
            ips.append(ipaddress.ip_address(name))
        except ValueError:
            dns.append(name)
    return dns, ips


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """A certificate chain and its key, as PEM files (what a TLS server is configured with)."""

    certfile: Path
    keyfile: Path


@dataclass(frozen=True, slots=True)
class ManagerCA:
    """The manager's certificate authority: it issues the api's and the broker's certificates."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, common_name: str = "Policycast manager CA") -> ManagerCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @classmethod
    def load_or_create(cls, directory: Path) -> ManagerCA:
        """The CA in `directory` (`ca.pem`, `ca.key`), made on first use. Processes starting at once
        take a lock to make it: one makes it, the others read it."""
        cert_path, key_path = directory / CA_FILE, directory / CA_KEY_FILE
        if not cert_path.exists():
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            with _locked(directory):
                if not cert_path.exists():
                    candidate = cls.generate()
                    write_private(key_path, candidate.key_pem)
                    _replace(cert_path, candidate.certificate_pem, mode=0o644)  # last: it says "done"
                    return candidate
        return cls.load(cert_path, key_path)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> ManagerCA:
        try:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise TlsError(f"cannot read the CA at {cert_path}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
            raise TlsError(f"{key_path} is not the key of {cert_path}")
        return cls(certificate, key)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def hash(self) -> str:
        return ca_hash(self.certificate_pem)

    def issue(
        self,
        names: Sequence[str],
        *,
        validity: datetime.timedelta = SERVER_VALIDITY,
        client_auth: bool = False,
    ) -> tuple[bytes, bytes]:
        """A server certificate (PEM, followed by the CA's) for `names`, and its key (PEM).

        `client_auth`: usable as a client certificate too (a broker node dialling another's route)."""
        dns, ips = parse_names(names)
        if not dns and not ips:
            raise TlsError("a server certificate needs at least one DNS name or IP address")
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        alternative: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        alternative += [x509.IPAddress(ip) for ip in ips]
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns or [str(ips[0])])[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + validity, self.certificate.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(_usages(client_auth)), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        chain = certificate.public_bytes(serialization.Encoding.PEM) + self.certificate_pem
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return chain, key_pem

    def server_files(
        self, directory: Path, name: str, names: Sequence[str], *, client_auth: bool = False
    ) -> CertificateFiles:
        """`<name>.pem` and `<name>.key` in `directory`, issued again when missing, for other names, from
        another CA, for other usages, or near their end."""
        files = CertificateFiles(directory / f"{name}.pem", directory / f"{name}.key")
        if not self._still_good(files, names, client_auth=client_auth):
            directory.mkdir(parents=True, exist_ok=True)
            chain, key = self.issue(names, client_auth=client_auth)
            write_private(files.keyfile, key)
            _replace(files.certfile, chain, mode=0o644)
        return files

    def _still_good(self, files: CertificateFiles, names: Sequence[str], *, client_auth: bool) -> bool:
        if not (files.certfile.exists() and files.keyfile.exists()):
            return False
        try:
            certificate = x509.load_pem_x509_certificate(files.certfile.read_bytes())
            alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, x509.ExtensionNotFound):
            return False
        if set(usages) != set(_usages(client_auth)):
            return False
        dns, ips = parse_names(names)
        held = set(alternative.get_values_for_type(x509.DNSName)) | {
            str(ip) for ip in alternative.get_values_for_type(x509.IPAddress)
        }
        try:
            certificate.verify_directly_issued_by(self.certificate)  # by this CA, not one named alike
        except (ValueError, TypeError, InvalidSignature):
            return False
        return (
            held == set(dns) | {str(ip) for ip in ips}
            and certificate.not_valid_after_utc - _now() > RENEW_BEFORE
        )


def _usages(client_auth: bool) -> list[x509.ObjectIdentifier]:
    return [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])


@dataclass(frozen=True, slots=True)
class ManagerTls:
    """What a manager process serves and trusts: its certificate files and the CAs agents pin."""

    ca: ManagerCA | None
    """The CA that issues certificates; None when the operator brought their own."""
    files: CertificateFiles
    trust_pem: bytes
    """The CA certificates the manager's servers chain to: what the bridge and agents trust."""

    @property
    def ca_hash(self) -> str:
        return ca_hash(self.trust_pem)

    def issue_files(
        self, directory: Path, name: str, names: Sequence[str], *, client_auth: bool = False
    ) -> CertificateFiles:
        """Certificate files for another server (the broker) in `directory`: issued by the CA, or the
        operator's own files, which must then carry the broker's names too (and, with `client_auth`,
        be usable as client certificates)."""
        if self.ca is None:
            return self.files
        return self.ca.server_files(directory, name, names, client_auth=client_auth)


def manager_tls(settings: Settings) -> ManagerTls:
    """The operator's certificate, key and CA when given; else the CA of the data directory (made at
    first start) and the api's certificate issued from it for `tls_names`."""
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        assert settings.tls_ca_file is not None  # the settings come in threes
        files = CertificateFiles(settings.tls_cert_file, settings.tls_key_file)
        try:
            trust = settings.tls_ca_file.read_bytes()
        except OSError as exc:
            raise TlsError(f"cannot read the CA file {settings.tls_ca_file}: {exc}") from exc
        return ManagerTls(None, files, trust)
    ca = ManagerCA.load_or_create(settings.tls_dir)
    files = ca.server_files(settings.tls_dir, "api", settings.tls_name_list)
    return ManagerTls(ca, files, ca.certificate_pem)


NEXT_DIR = "next"
RETIRED_DIR = "retired"


def prepare_next_ca(settings: Settings) -> ManagerCA:
    """The CA that will succeed the data directory's (`tls/next/`), made unless it exists: the first
    step of a rotation. It issues nothing until it is promoted."""
    return ManagerCA.load_or_create(settings.tls_dir / NEXT_DIR)


def promote_next_ca(settings: Settings) -> tuple[ManagerCA, ManagerCA]:
    """Make the prepared CA the one that issues certificates; return (old, new). The old one is kept
    under `tls/retired/`. Servers take certificates from the new CA at their next start (a
    certificate from another CA is issued again)."""
    directory = settings.tls_dir
    next_dir = directory / NEXT_DIR
    if not (next_dir / CA_FILE).exists():
        raise TlsError(f"no CA prepared in {next_dir}: prepare one first")
    with _locked(directory):
        old = ManagerCA.load(directory / CA_FILE, directory / CA_KEY_FILE)
        new = ManagerCA.load(next_dir / CA_FILE, next_dir / CA_KEY_FILE)
        kept = directory / RETIRED_DIR / old.hash.removeprefix("sha256:")
        kept.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in (CA_KEY_FILE, CA_FILE):
            os.replace(directory / name, kept / name)
        for name in (CA_KEY_FILE, CA_FILE):  # the certificate last: it says the CA is complete
            os.replace(next_dir / name, directory / name)
        (next_dir / ".lock").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            next_dir.rmdir()
    return old, new


def manager_trust(settings: Settings) -> bytes:
    """The CA certificates the manager's servers chain to, for its own clients (the bridge, tools):
    the operator's CA file, else the data directory's CA, which only the api and `broker-config` make."""
    path = settings.tls_ca_file or settings.tls_dir / CA_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(
            f"no CA at {path}: point POLICYCAST_DATA_DIR at the manager's data directory, set "
            "POLICYCAST_TLS_CA_FILE, or start the api once (it makes the CA)"
        ) from None
    except OSError as exc:
        raise TlsError(f"cannot read the CA at {path}: {exc}") from exc


def server_context(files: CertificateFiles) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 and newer) for `files`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.certfile, files.keyfile)
    return context


def client_context(trusted_pem: bytes) -> ssl.SSLContext:
    """A TLS client context that trusts exactly the CAs in `trusted_pem`, not the system store, and
    checks the server's name."""
    if not split_certificates(trusted_pem):
        raise TlsError("no CA certificate to trust")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=trusted_pem.decode("ascii"))
    return context


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, readable by its owner only (0600 from the start)."""
    _replace(path, data, mode=0o600)


def _replace(path: Path, data: bytes, *, mode: int) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), mode)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with (directory / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
