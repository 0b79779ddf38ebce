"""The CAs agents trust: the manager's own, added at its first start, and those of a CA rotation.

Every document names them all (`trust.ca_certificates`), so a change here is a change of every
document: a new serial for each, by push and by heartbeat. A rotation adds the new CA, waits until
agents hold documents naming it, lets the servers take certificates from it, and then retires the old
one (docs/operations.md, "TLS").
"""

from __future__ import annotations

from sqlmodel import Session, col, select

from api.errors import Conflict, Invalid, NotFound
from api.services.change import Change
from fabric_core.tls import TlsError, ca_hash, parse_ca_hash, split_certificates
from manager_db.models import TrustedCa


def trusted(session: Session) -> list[TrustedCa]:
    """The trusted CAs, oldest first."""
    return list(session.exec(select(TrustedCa).order_by(col(TrustedCa.added_at), col(TrustedCa.sha256))))


def trust_ca(change: Change, *, pem: bytes) -> tuple[TrustedCa, bool]:
    """Add a CA certificate (one PEM certificate) to what agents trust; (row, True if it is new)."""
    certificates = split_certificates(pem)
    if len(certificates) != 1:
        raise Invalid(f"give exactly one PEM certificate, not {len(certificates)}")
    try:
        digest = ca_hash(certificates[0])
    except TlsError as exc:
        raise Invalid(str(exc)) from exc
    existing = change.session.get(TrustedCa, digest)
    if existing is not None:
        return existing, False
    row = TrustedCa(sha256=digest, pem=certificates[0].decode("ascii"))
    change.session.add(row)
    change.session.flush()
    change.audit("tls.trust_ca", f"ca:{digest}")
    change.refresh(None)  # every document names the trusted CAs
    return row, True


def retire_ca(change: Change, *, sha256: str) -> None:
    """Stop trusting a CA; the last one cannot go (agents would trust nothing)."""
    try:
        digest = parse_ca_hash(sha256)
    except TlsError as exc:
        raise Invalid(str(exc)) from exc
    row = change.session.get(TrustedCa, digest)
    if row is None:
        raise NotFound(f"no trusted CA {digest}")
    if len(trusted(change.session)) == 1:
        raise Conflict("that is the only trusted CA: trust its successor first")
    change.session.delete(row)
    change.session.flush()
    change.audit("tls.retire_ca", f"ca:{digest}")
    change.refresh(None)
