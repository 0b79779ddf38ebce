"""Secrets: API keys, agent secrets and enrolment tokens.

All three are random 256-bit strings, so a single SHA-256 is the right hash: a slow password hash
protects low-entropy passwords, and would put milliseconds on every heartbeat for nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

Role = Literal["admin", "viewer"]


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def same_secret(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@dataclass(frozen=True)
class Principal:
    """Who is calling the admin API."""

    name: str
    role: Role

    @property
    def can_change(self) -> bool:
        return self.role == "admin"
