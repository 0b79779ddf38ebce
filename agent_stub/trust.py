"""The CAs an agent trusts: pinned by hash at enrolment, then exactly what signed documents name.

Enrolment over https:// (`pin`) settles the CA before the token leaves the agent. The hash comes with
the join token (`pcet_<secret>.sha256:<hex>`, as `policycast admin enroll-token` prints it) or from
`--ca-hash` (`resolve_pin`). The agent fetches the CA bundle the server offers (`GET /agent/v1/ca`,
unverified: nothing secret travels on it, and what it returns is checked against the hash), keeps the
certificate(s) whose hash is the pinned one, and only then opens a connection that trusts just those to
send its token: a server whose certificate does not chain to the pinned CA fails the handshake.

From then on (`context_for`) the agent trusts only the CAs its identity holds (`Identity.trusted_cas`),
for HTTPS and MQTTS alike, never the system store. A verified document that names other CAs
(`adopted`) replaces them: that is how a CA rotation reaches the agent (old CA; then old and
new; then new only). An identity without CAs (enrolled over plain HTTP with `--insecure-http`, or
stored before pinning existed) keeps the defaults until a document names some.
"""

from __future__ import annotations

import functools
import logging
import ssl
import sys
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import httpx

from agent_stub.errors import ManagerRejected, TrustError
from agent_stub.manager_client import ManagerClient
from fabric_core.tls import (
    TlsError,
    ca_hash,
    client_context,
    parse_ca_hash,
    split_certificates,
    split_join_token,
)
from fabric_core.wire import EffectiveDocument

log = logging.getLogger(__name__)


@runtime_checkable
class TrustingClient(Protocol):
    """A client whose trust can follow the agent's (`ManagerClient` owning its pool)."""

    def use_ssl_context(self, context: ssl.SSLContext | None) -> None: ...


def resolve_pin(token: str, ca_hash_option: str | None) -> tuple[str, str | None]:
    """(bare token, CA hash to pin or None) from a join token or a bare one, and `--ca-hash`.

    Raises TrustError for a malformed hash or for two different ones.
    """
    try:
        bare, in_token = split_join_token(token)
        given = parse_ca_hash(ca_hash_option) if ca_hash_option is not None else None
    except TlsError as exc:
        raise TrustError(str(exc)) from exc
    if in_token is not None and given is not None and in_token != given:
        raise TrustError(f"the join token pins {in_token} but --ca-hash says {given}: which CA is it?")
    return bare, in_token or given


async def pin(
    server: str, pinned: str, *, timeout_s: float, transport: httpx.AsyncBaseTransport | None = None
) -> list[str]:
    """The certificate(s) of the CA `pinned` among those the server offers (`GET /agent/v1/ca`).

    Raises TrustError when none matches (or the server offers none): the token must not be sent then.
    A server that cannot be reached raises `ManagerUnreachable`.
    """
    try:
        bundle = await ManagerClient.ca_bundle(server=server, timeout_s=timeout_s, transport=transport)
    except ManagerRejected as exc:
        raise TrustError(
            f"the manager at {server} offers no CA (HTTP {exc.status} on /agent/v1/ca), expected "
            f"{pinned}: refusing: nothing was sent"
        ) from exc
    return pinned_from_bundle(bundle, pinned, server=server)


def pinned_from_bundle(bundle: bytes, pinned: str, *, server: str) -> list[str]:
    """The certificates of `bundle` whose hash is `pinned` (as PEM text); TrustError when none."""
    offered: list[str] = []
    kept: list[str] = []
    for certificate in split_certificates(bundle):
        try:
            digest = ca_hash(certificate)
        except TlsError:
            continue  # an unreadable block cannot be the pinned CA
        offered.append(digest)
        if digest == pinned:
            kept.append(sys.intern(certificate.decode("ascii")))
    if not kept:
        listed = ", ".join(offered) if offered else "no certificate"
        raise TrustError(
            f"the manager at {server} offers {listed}, not the pinned CA {pinned}: refusing: nothing was sent"
        )
    return kept


def context_for(cas: Sequence[str]) -> ssl.SSLContext | None:
    """A TLS client context that trusts exactly `cas` (None for none: the caller's defaults).

    One context per distinct set, shared: a fleet of simulated agents holds one, not thousands.
    """
    return _context(tuple(cas)) if cas else None


@functools.lru_cache(maxsize=8)
def _context(cas: tuple[str, ...]) -> ssl.SSLContext:
    return client_context("".join(cas).encode("ascii"))


def adopted(doc: EffectiveDocument, held: Sequence[str]) -> list[str] | None:
    """The CAs a verified document names, when they are another set than `held`; else None.

    None too when it names none, or names something that is not a usable certificate: the agent then
    keeps what it trusts (a trust it could not load would cut it off from its manager). Cheap in the
    common case, a document naming what the agent holds: no certificate is parsed then, which matters
    to a fleet of simulated agents applying the same document at once.
    """
    if doc.trust is None or not doc.trust.ca_certificates:
        return None
    try:
        named = [
            sys.intern(certificate.decode("ascii"))
            for text in doc.trust.ca_certificates
            for certificate in _certificates(text)
        ]
        if named == list(held):
            return None
        context_for(named)  # parses them all (and is the context the agent will use)
        if hashes(named) == hashes(held):
            return None  # the same CAs, in another order
    except (TlsError, ValueError, ssl.SSLError) as exc:
        log.error("serial %d names CAs the agent cannot use, keeping its trust: %s", doc.serial, exc)
        return None
    return named


def _certificates(text: str) -> list[bytes]:
    certificates = split_certificates(text.encode("ascii"))  # UnicodeEncodeError is a ValueError
    if not certificates:
        raise TlsError("not a PEM certificate")
    return certificates


def hashes(cas: Sequence[str]) -> frozenset[str]:
    """The `sha256:` hashes of PEM certificates."""
    return frozenset(ca_hash(pem.encode("ascii")) for pem in cas)
