"""The exception hierarchy of the Policycast contract.

    PolicycastError
    ├── ContractError            input that breaks the contract (bad topic, bad id, bad document)
    │   ├── InvalidTopic
    │   ├── InvalidIdentifier
    │   └── InvalidDocument
    ├── SignatureError           an envelope that must not be trusted
    │   ├── UnknownSigningKey    signed by a key id the verifier has not pinned
    │   └── BadSignature         the signature does not match the document bytes
    └── StaleSerial              a document no newer than the one already held (anti-rollback)

Callers catch the narrowest class they can act on; everything here is an expected outcome of bad input,
never a programming error, so it is safe to log and drop.
"""

from __future__ import annotations


class PolicycastError(Exception):
    """Base class for every error raised by the contract."""


class ContractError(PolicycastError, ValueError):
    """Input that does not follow the contract."""


class InvalidTopic(ContractError):
    """A topic that is not one of the scheme's, or a malformed one."""


class InvalidIdentifier(ContractError):
    """An id that is empty or holds an MQTT-reserved character."""


class InvalidDocument(ContractError):
    """A payload that is not a well-formed envelope or effective configuration document."""


class SignatureError(PolicycastError):
    """An envelope whose signature cannot be trusted."""


class UnknownSigningKey(SignatureError):
    """The envelope names a key id that the verifier has not pinned."""


class BadSignature(SignatureError):
    """The signature does not verify against the canonical document bytes."""


class StaleSerial(PolicycastError):
    """A document whose serial is not newer than the one already applied."""

    def __init__(self, offered: int, held: int) -> None:
        super().__init__(f"serial {offered} is not newer than the held serial {held}")
        self.offered = offered
        self.held = held
