"""NATS nkeys: Ed25519 keys in NATS's text encoding (base32 of a type prefix, the key and a CRC-16).

A public key reads `O…` (operator), `A…` (account) or `U…` (user); a seed reads `SO…`, `SA…`, `SU…`.
The encoding is nkeys's (github.com/nats-io/nkeys, `strkey.go`): one prefix byte (the type, shifted
left by 3) before the 32-byte public key, or two bytes for a seed (`S` and the type spread over
them), then a little-endian CRC-16/XMODEM of everything before it, in RFC 4648 base32 without padding.

`KeyPair.derived(parent, label, kind)`: a key made from another's seed and a label (HMAC-SHA256),
so that every replica holding the account seed makes the same user key for an agent, and an agent's
access can be revoked by its public key without storing one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

_KEY_BYTES = 32
_PREFIX_SEED = 18 << 3  # "S"


class KeyKind(IntEnum):
    """The type prefix byte of a public key (its first base32 letter)."""

    OPERATOR = 14 << 3  # "O"
    ACCOUNT = 0  # "A"
    USER = 20 << 3  # "U"


class NkeyError(ValueError):
    """Text that is not an nkey of the expected kind (bad base32, length, checksum or prefix)."""


def _crc16(data: bytes) -> int:
    """CRC-16/XMODEM (polynomial 0x1021, initial value 0), as nkeys checks its keys with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _encode(raw: bytes) -> str:
    checked = raw + _crc16(raw).to_bytes(2, "little")
    return base64.b32encode(checked).decode("ascii").rstrip("=")


def _decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 8)
    try:
        raw = base64.b32decode(padded)
    except (binascii.Error, ValueError) as exc:
        raise NkeyError(f"not base32: {exc}") from None
    if len(raw) < 3:
        raise NkeyError("too short for an nkey")
    body, checksum = raw[:-2], int.from_bytes(raw[-2:], "little")
    if _crc16(body) != checksum:
        raise NkeyError("checksum mismatch")
    return body


def encode_public(kind: KeyKind, public_raw: bytes) -> str:
    return _encode(bytes([kind]) + public_raw)


def decode_public(text: str, *kinds: KeyKind) -> bytes:
    """The raw 32-byte Ed25519 key of a public nkey, of one of `kinds` (any kind when none given)."""
    body = _decode(text)
    if len(body) != 1 + _KEY_BYTES:
        raise NkeyError("not a public nkey (wrong length)")
    if body[0] not in {int(k) for k in (kinds or tuple(KeyKind))}:
        raise NkeyError(f"public nkey of an unexpected kind ({text[:1]!r})")
    return body[1:]


def kind_of(public: str) -> KeyKind:
    body = _decode(public)
    try:
        return KeyKind(body[0])
    except ValueError:
        raise NkeyError(f"unknown nkey prefix {public[:1]!r}") from None


def encode_seed(kind: KeyKind, seed_raw: bytes) -> str:
    first = _PREFIX_SEED | (int(kind) >> 5)
    second = (int(kind) & 31) << 3
    return _encode(bytes([first, second]) + seed_raw)


def decode_seed(text: str) -> tuple[KeyKind, bytes]:
    body = _decode(text)
    if len(body) != 2 + _KEY_BYTES:
        raise NkeyError("not an nkey seed (wrong length)")
    if body[0] & 0xF8 != _PREFIX_SEED:
        raise NkeyError("not an nkey seed (no S prefix)")
    kind_byte = ((body[0] & 0x07) << 5) | ((body[1] & 0xF8) >> 3)
    try:
        kind = KeyKind(kind_byte)
    except ValueError:
        raise NkeyError("an nkey seed of an unknown kind") from None
    return kind, body[2:]


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An nkey with its private half: signs JWTs and nonces."""

    kind: KeyKind
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls, kind: KeyKind) -> KeyPair:
        return cls(kind, Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: str) -> KeyPair:
        kind, raw = decode_seed(seed.strip())
        return cls(kind, Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def derived(cls, parent: KeyPair, label: str, kind: KeyKind) -> KeyPair:
        """A key bound to `parent`'s seed and `label`: the same for everyone holding `parent`."""
        digest = hmac.new(parent.seed_raw, b"policycast-nats-nkey:" + label.encode(), hashlib.sha256)
        return cls(kind, Ed25519PrivateKey.from_private_bytes(digest.digest()))

    @property
    def seed_raw(self) -> bytes:
        return self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def seed(self) -> str:
        """The seed in nkey text (`S…`): a secret, never logged."""
        return encode_seed(self.kind, self.seed_raw)

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def public_key(self) -> str:
        return encode_public(self.kind, self.public_raw)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def __repr__(self) -> str:  # never the seed
        return f"KeyPair({self.kind.name}, {self.public_key})"


def verify(public: str, data: bytes, signature: bytes) -> bool:
    """Whether `signature` over `data` is by the nkey `public`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(decode_public(public))
        key.verify(signature, data)
    except (NkeyError, InvalidSignature, ValueError):
        return False
    return True
