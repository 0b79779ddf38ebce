"""The NATS engine's keys: operator, account, system account and system user, made once and shared.

They are kept the way the signing key is (`fabric_core.signing.load_signing_key`): the setting
`POLICYCAST_NATS_KEYS` when given (every replica the same: the JSON of the file below), else
`$POLICYCAST_DATA_DIR/nats_keys.json` (0600), made at the first `write_config` under a file lock, so
that processes starting at once make one set. Everything else (the api, the bridge) only reads them:
keys of their own would mint JWTs that no broker trusts.

Agents' user keys are not stored: `NatsKeys.agent_user` derives each from the account seed and the
agent id, so every replica mints JWTs with the same subject and a revocation by public key holds
for every JWT the agent was ever given.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from broker_bridge.nats.nkeys import KeyKind, KeyPair, NkeyError
from fabric_core.settings import Settings
from fabric_core.tls import write_private

KEYS_FILE = "nats_keys.json"
_ROLES: dict[str, KeyKind] = {
    "operator": KeyKind.OPERATOR,
    "account": KeyKind.ACCOUNT,
    "system_account": KeyKind.ACCOUNT,
    "system_user": KeyKind.USER,
}


class NatsKeysMissing(ValueError):
    """No NATS keys where this process looks, and it may not make them."""


@dataclass(frozen=True, slots=True)
class NatsKeys:
    operator: KeyPair
    account: KeyPair
    """The one account agents and the bridge live in (JetStream on)."""
    system_account: KeyPair
    system_user: KeyPair
    """The system account's user: the bridge pushes account JWTs to the cluster as it."""

    @classmethod
    def generate(cls) -> NatsKeys:
        return cls(**{role: KeyPair.generate(kind) for role, kind in _ROLES.items()})

    @classmethod
    def from_json(cls, text: str) -> NatsKeys:
        try:
            seeds = json.loads(text)
            pairs = {role: KeyPair.from_seed(seeds[role]) for role in _ROLES}
        except (json.JSONDecodeError, KeyError, TypeError, NkeyError) as exc:
            raise ValueError(f"NATS keys must be JSON with the seeds {sorted(_ROLES)}: {exc}") from None
        for role, pair in pairs.items():
            if pair.kind != _ROLES[role]:
                raise ValueError(f"the NATS {role} seed is a {pair.kind.name.lower()} seed")
        return cls(**pairs)

    def to_json(self) -> str:
        """The seeds, as the file and `POLICYCAST_NATS_KEYS` hold them: a secret."""
        return json.dumps({role: getattr(self, role).seed for role in _ROLES}, indent=2) + "\n"

    def agent_user(self, agent_id: str) -> KeyPair:
        """The agent's user key, derived from the account seed: the same on every replica."""
        return KeyPair.derived(self.account, f"agent:{agent_id}", KeyKind.USER)

    def bridge_user(self) -> KeyPair:
        return KeyPair.derived(self.account, "bridge", KeyKind.USER)

    def __repr__(self) -> str:  # never the seeds
        return f"NatsKeys(operator={self.operator.public_key}, account={self.account.public_key})"


def keys_path(settings: Settings) -> Path:
    return settings.data_dir / KEYS_FILE


def load_nats_keys(settings: Settings, *, create: bool = False) -> NatsKeys:
    """The engine's keys: from `nats_keys` (every replica the same), else the data directory's file,
    made there when `create` (the first `write_config`) and absent."""
    if settings.nats_keys is not None:
        return NatsKeys.from_json(settings.nats_keys.get_secret_value())
    path = keys_path(settings)
    if not path.exists():
        if not create:
            raise NatsKeysMissing(
                f"no NATS keys at {path}: write the broker configuration first (policycast broker-config "
                "--engine nats) with this POLICYCAST_DATA_DIR, or set POLICYCAST_NATS_KEYS"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.parent):
            if not path.exists():
                keys = NatsKeys.generate()
                write_private(path, keys.to_json().encode())  # 0600 from the start, whole or absent
                return keys
    return NatsKeys.from_json(path.read_text())


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with (directory / ".nats_keys.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
