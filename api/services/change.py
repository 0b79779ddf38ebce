"""The unit of operator change: one transaction, the change lock, an audit row, recomputed documents.

Commit through `Change.commit`: it writes the change's `ChangeRecord` (when it committed, which
serials it issued) in the same transaction, which the convergence SLO is measured from
(`manager_db.convergence`, `api.services.convergence`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session

from api.resolution import RefreshResult, refresh_documents
from fabric_core.signing import SigningKey
from manager_db.counters import begin_change
from manager_db.models import AuditEntry, ChangeRecord, utcnow


@dataclass
class Change:
    session: Session
    actor: str
    signing_key: SigningKey | None
    """None for a change that recomputes no document (API keys from the command line)."""
    after_commit: Callable[[], object] | None = None
    generation: int = field(init=False)
    issued: list[int] = field(init=False, default_factory=list)
    """The serials this change gave documents, in order (consecutive: allocated under the change lock)."""

    def __post_init__(self) -> None:
        self.generation = begin_change(self.session)

    def refresh(self, group_ids: Iterable[int] | None) -> RefreshResult:
        if self.signing_key is None:
            raise RuntimeError("this change has no signing key: it cannot recompute documents")
        result = refresh_documents(self.session, signing_key=self.signing_key, group_ids=group_ids)
        self.issued.extend(serial for _, _, serial in result.changed)
        return result

    def audit(self, action: str, target: str, **detail: Any) -> None:
        self.session.add(
            AuditEntry(
                actor=self.actor, action=action, target=target, detail=detail, generation=self.generation
            )
        )

    def commit(self) -> None:
        # The record goes in last, its time taken just before the commit: an agent cannot hold one of
        # these serials before then, so convergence is never measured from too late a moment.
        self.session.add(
            ChangeRecord(
                generation=self.generation,
                committed_at=utcnow(),
                actor=self.actor[:128],
                first_serial=min(self.issued) if self.issued else None,
                last_serial=max(self.issued) if self.issued else None,
                documents=len(self.issued),
            )
        )
        self.session.commit()
        if self.after_commit is not None:
            self.after_commit()
