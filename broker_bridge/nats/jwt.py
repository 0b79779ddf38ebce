"""NATS v2 JWTs: minted and decoded as nats-server (github.com/nats-io/jwt/v2) reads them.

A JWT is `base64url(header).base64url(claims).base64url(signature)`, no padding, the header
`{"typ":"JWT","alg":"ed25519-nkey"}`, the signature the issuer's Ed25519 over the first two parts.
Claims carry `jti` (base32 of SHA-512/256 of the JSON of the standard claims, `nats` left out, as the
Go library computes it: two tokens about one subject issued in the same second share it), `iat`,
`iss` (the issuer's public nkey), `sub`, `name`, `exp` when the token expires, and `nats`:
`{"type": operator|account|user, "version": 2, ...}`, in the Go library's field order.

The builders (`operator_claims`, `account_claims`, `user_claims`) give the `nats` part of each kind;
`encode` signs, `decode` checks the signature and the kind.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from broker_bridge.nats.nkeys import KeyKind, KeyPair, NkeyError, kind_of, verify

ClaimsKind = Literal["operator", "account", "user"]
HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_ALGORITHMS = ("ed25519-nkey", "ed25519")  # v2, and v1 tokens that servers still read
_ISSUERS: dict[ClaimsKind, tuple[KeyKind, ...]] = {
    "operator": (KeyKind.OPERATOR,),
    "account": (KeyKind.OPERATOR,),
    "user": (KeyKind.ACCOUNT,),
}
UNLIMITED = -1


class JwtError(ValueError):
    """A token that is not a NATS JWT of the expected kind, or whose signature does not hold."""


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise JwtError(f"not base64url: {exc}") from None


_STANDARD = ("aud", "exp", "iat", "iss", "name", "nbf", "sub")


def claims_id(claims: Mapping[str, Any]) -> str:
    """`jti`: base32 (no padding) of SHA-512/256 over the JSON of the standard claims (not `jti`,
    not `nats`), in the Go library's order.

    nats-server ignores an account JWT whose `jti` it already holds: pushes of one account must
    differ in `iat` (or another standard claim)."""
    without = {k: claims[k] for k in _STANDARD if k in claims}
    digest = hashlib.new("sha512_256", _json(without)).digest()
    return base64.b32encode(digest).decode("ascii").rstrip("=")


def encode(
    issuer: KeyPair,
    *,
    subject: str,
    name: str,
    nats: Mapping[str, Any],
    expires: int | None = None,
    issued_at: int | None = None,
) -> str:
    """A JWT with the claims `nats` (from a builder below) about `subject`, signed by `issuer`."""
    claims: dict[str, Any] = {}
    if expires is not None:
        claims["exp"] = int(expires)
    claims["jti"] = ""
    claims["iat"] = int(issued_at if issued_at is not None else time.time())
    claims["iss"] = issuer.public_key
    claims["name"] = name
    claims["sub"] = subject
    claims["nats"] = dict(nats)
    claims["jti"] = claims_id(claims)
    signed = f"{_b64(_json(HEADER))}.{_b64(_json(claims))}"
    return f"{signed}.{_b64(issuer.sign(signed.encode('ascii')))}"


def decode(token: str, kind: ClaimsKind | None = None, *, now: float | None = None) -> dict[str, Any]:
    """The claims of `token` once its header, signature (by its `iss`) and kind check out.

    With `now`, an expired token (`exp` at or before `now`) is refused too."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise JwtError("a JWT has three parts")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
    except json.JSONDecodeError as exc:
        raise JwtError(f"not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("alg") not in _ALGORITHMS:
        raise JwtError(f"not a NATS JWT header: {header!r}")
    if not isinstance(claims, dict) or not isinstance(claims.get("nats"), dict):
        raise JwtError("claims without a nats section")
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or not verify(
        issuer, f"{parts[0]}.{parts[1]}".encode("ascii"), _unb64(parts[2])
    ):
        raise JwtError("the signature does not match the issuer")
    found = claims["nats"].get("type")
    if kind is not None:
        if found != kind:
            raise JwtError(f"a {found} JWT where a {kind} JWT was expected")
        try:
            issuer_kind = kind_of(issuer)
        except NkeyError as exc:
            raise JwtError(f"issuer: {exc}") from None
        if issuer_kind not in _ISSUERS[kind]:
            raise JwtError(f"a {kind} JWT issued by a {issuer_kind.name.lower()} key")
    expires = claims.get("exp")
    if now is not None and isinstance(expires, int) and expires <= now:
        raise JwtError("the JWT has expired")
    return claims


# --- the claims of each kind ---------------------------------------------------------------------


def operator_claims(*, system_account: str) -> dict[str, Any]:
    return {"system_account": system_account, "type": "operator", "version": 2}


def account_claims(*, jetstream: bool, revocations: Mapping[str, int] | None = None) -> dict[str, Any]:
    """An account without limits on connections and subscriptions; JetStream (which NATS's MQTT
    needs for sessions and retained messages) on when `jetstream`. `revocations`: user public key ->
    unix time; the account refuses (and disconnects) that user's JWTs issued at or before it."""
    storage = UNLIMITED if jetstream else 0
    limits = {
        "subs": UNLIMITED,
        "data": UNLIMITED,
        "payload": UNLIMITED,
        "imports": UNLIMITED,
        "exports": UNLIMITED,
        "wildcards": True,
        "conn": UNLIMITED,
        "leaf": UNLIMITED,
        "mem_storage": storage,
        "disk_storage": storage,
        "streams": UNLIMITED if jetstream else 0,
        "consumer": UNLIMITED if jetstream else 0,
    }
    claims: dict[str, Any] = {"limits": limits, "default_permissions": {"pub": {}, "sub": {}}}
    if revocations:
        claims["revocations"] = {key: int(at) for key, at in sorted(revocations.items())}
    claims.update(type="account", version=2)
    return claims


def user_claims(
    *,
    publish: Sequence[str] | None,
    subscribe: Sequence[str] | None,
    bearer: bool,
    connection_types: Sequence[str] = (),
) -> dict[str, Any]:
    """A user's claims: allow-lists of NATS subjects (None: no restriction; empty: nothing), a bearer
    token (no nonce to sign: what MQTT clients need), and the connection types it may use."""
    claims: dict[str, Any] = {
        "pub": _permission(publish),
        "sub": _permission(subscribe),
        "subs": UNLIMITED,
        "data": UNLIMITED,
        "payload": UNLIMITED,
    }
    if bearer:
        claims["bearer_token"] = True
    if connection_types:
        claims["allowed_connection_types"] = list(connection_types)
    claims.update(type="user", version=2)
    return claims


def _permission(allowed: Sequence[str] | None) -> dict[str, list[str]]:
    """NATS reads an empty allow-list as no restriction (the field is left out): nothing allowed is
    a deny of everything instead."""
    if allowed is None:
        return {}
    return {"allow": list(allowed)} if allowed else {"deny": [">"]}
