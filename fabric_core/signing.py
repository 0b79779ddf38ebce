"""Ed25519 signing of effective documents, and verification by agents.

An envelope is `{"doc": {...}, "sig": base64, "kid": str}`, where `sig` signs the canonical bytes of
`doc` (`fabric_core.canonical`). The key id is derived from the public key, so an agent that pinned a key
at enrolment can tell at once whether an envelope was signed by it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fabric_core.canonical import canonical_json
from fabric_core.errors import BadSignature, InvalidDocument, UnknownSigningKey
from fabric_core.settings import Settings

_SEED_BYTES = 32


def key_id(public_raw: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A pinned public key."""

    kid: str
    public: Ed25519PublicKey

    @classmethod
    def from_base64(cls, kid: str, public_key: str) -> VerifyKey:
        try:
            raw = base64.b64decode(public_key, validate=True)
            public = Ed25519PublicKey.from_public_bytes(raw)
        except (binascii.Error, ValueError) as exc:
            raise InvalidDocument(f"not a base64 raw Ed25519 public key: {exc}") from exc
        if key_id(raw) != kid:
            raise InvalidDocument(f"key id {kid!r} does not match the public key")
        return cls(kid, public)

    @property
    def public_base64(self) -> str:
        return base64.b64encode(self.public.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


@dataclass(frozen=True, slots=True)
class SigningKey:
    """The manager's private key."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed_base64(cls, seed: str) -> SigningKey:
        try:
            raw = base64.b64decode(seed, validate=True)
        except binascii.Error as exc:
            raise ValueError("signing key is not base64") from exc
        if len(raw) != _SEED_BYTES:
            raise ValueError(f"signing key must be {_SEED_BYTES} bytes, got {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """Read the seed at `path`, creating it (mode 0600, atomically) on first use."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            candidate = cls.generate()
            # Written whole under a temporary name, then linked into place: a process starting at the same
            # time either finds no file or a complete one, never an empty one.
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(candidate.seed_base64 + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                try:
                    os.link(temporary, path)
                except FileExistsError:
                    pass  # another process won the race: use its key
                else:
                    return candidate
            finally:
                os.unlink(temporary)
        return cls.from_seed_base64(path.read_text().strip())

    @property
    def seed_base64(self) -> str:
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        raw = self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return base64.b64encode(raw).decode()

    def derive_secret(self, label: str) -> str:
        """A secret bound to this key and `label` (e.g. an agent's broker password).

        Derived, not stored: every api replica and bridge that shares the signing key can recompute it,
        so broker accounts can be (re)provisioned at any time without keeping passwords anywhere.
        """
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        seed = self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        digest = hmac.new(seed, b"policycast-derive:" + label.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    @property
    def verify_key(self) -> VerifyKey:
        public = self.private.public_key()
        return VerifyKey(key_id(public.public_bytes(Encoding.Raw, PublicFormat.Raw)), public)

    def sign_envelope(self, doc: dict[str, Any]) -> bytes:
        """The canonical bytes of the signed envelope around `doc`."""
        signature = self.private.sign(canonical_json(doc))
        return canonical_json(
            {"doc": doc, "sig": base64.b64encode(signature).decode(), "kid": self.verify_key.kid}
        )


def open_envelope(payload: bytes | str | dict[str, Any], key: VerifyKey) -> dict[str, Any]:
    """Verify an envelope against the pinned key and return its document.

    Raises `InvalidDocument` when the payload is not an envelope, `UnknownSigningKey` when it names
    another key, `BadSignature` when the signature does not match.
    """
    if isinstance(payload, dict):
        envelope: Any = payload
    else:
        try:
            envelope = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise InvalidDocument(f"envelope is not JSON: {exc}") from exc
    if not isinstance(envelope, dict) or set(envelope) != {"doc", "sig", "kid"}:
        raise InvalidDocument("envelope must be an object with exactly doc, sig and kid")
    doc, sig, kid = envelope["doc"], envelope["sig"], envelope["kid"]
    if not isinstance(doc, dict) or not isinstance(sig, str) or not isinstance(kid, str):
        raise InvalidDocument("envelope doc must be an object, sig and kid strings")
    if kid != key.kid:
        raise UnknownSigningKey(f"envelope signed by {kid!r}, pinned key is {key.kid!r}")
    try:
        signature = base64.b64decode(sig, validate=True)
    except binascii.Error as exc:
        raise BadSignature("signature is not base64") from exc
    if base64.b64encode(signature).decode() != sig:  # one encoding only: the envelope bytes are fixed too
        raise BadSignature("signature is not in canonical base64")
    try:
        key.public.verify(signature, canonical_json(doc))
    except InvalidSignature as exc:
        raise BadSignature("signature does not match the document") from exc
    return doc


def load_signing_key(settings: Settings, *, create: bool = True) -> SigningKey:
    """The manager's key: from settings (every replica the same), else the data directory's file.

    `create=False` (the bridge, broker-config) refuses to make a new key: a key of its own would
    derive broker passwords that match no agent's.
    """
    if settings.signing_key is not None:
        return SigningKey.from_seed_base64(settings.signing_key.get_secret_value())
    path = settings.signing_key_path
    if not create and not path.exists():
        raise ValueError(
            f"no signing key at {path}: point POLICYCAST_DATA_DIR at the manager's data directory "
            "or set POLICYCAST_SIGNING_KEY (the api makes the key on its first start)"
        )
    return SigningKey.load_or_create(path)
