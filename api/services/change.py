"""The unit of operator change: one transaction, the change lock, an audit row, recomputed documents."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session

from api.resolution import RefreshResult, refresh_documents
from fabric_core.signing import SigningKey
from manager_db.counters import begin_change
from manager_db.models import AuditEntry


@dataclass
class Change:
    session: Session
    actor: str
    signing_key: SigningKey | None
    """None for a change that recomputes no document (API keys from the command line)."""
    after_commit: Callable[[], object] | None = None
    generation: int = field(init=False)

    def __post_init__(self) -> None:
        self.generation = begin_change(self.session)

    def refresh(self, group_ids: Iterable[int] | None) -> RefreshResult:
        if self.signing_key is None:
            raise RuntimeError("this change has no signing key: it cannot recompute documents")
        return refresh_documents(self.session, signing_key=self.signing_key, group_ids=group_ids)

    def audit(self, action: str, target: str, **detail: Any) -> None:
        self.session.add(AuditEntry(actor=self.actor, action=action, target=target, detail=detail))

    def commit(self) -> None:
        self.session.commit()
        if self.after_commit is not None:
            self.after_commit()
