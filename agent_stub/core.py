"""The agent's apply logic, independent of any transport: verify, parse, check, keep.

Every source of documents (a heartbeat response, `GET /config`, an MQTT message, the fleet simulator)
hands the envelope to `AgentCore.offer`, which applies it only when it is signed by the pinned key, well
formed, meant for the agent's group and not a rollback (`fabric_core.serials.require_applicable`: strictly
newer than the last document applied for the same (group, location)). Bad input never raises: it comes
back as an `ApplyOutcome`, so a hostile or broken payload cannot stop a loop.

The group is the manager's to change: a document for another group is accepted only from the manager's
own authenticated answers (`TRUSTED_FOR_GROUP_CHANGE`), which is how an agent learns that an operator
moved it; a config topic of another group could not reach it anyway (the broker's ACL).

A document that names other CAs than the agent trusts replaces them in the identity (`_adopt_trust`, as a
group change does), so the next connections trust those (a CA rotation; `agent_stub.trust`).

Transports learn of every applied document, whatever its source, through `add_listener` (the push loop
moves its subscription when the held (group, location) changes; the runtime switches push and pull).

New broker credentials (a heartbeat's `mqtt`, a `credentials` command: a renewed or re-scoped NATS JWT)
replace the identity's through `adopt_credentials`, which stores the identity (atomically, as every
identity write) and tells `add_credentials_listener`'s listeners (the push loop reconnects with them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from agent_stub import trust
from agent_stub.errors import NotEnrolledError
from agent_stub.state import AgentStatus, Identity, StateStore, StoredMqttCredentials, credentials_problem
from fabric_core.canonical import canonical_json
from fabric_core.errors import InvalidDocument, PolicycastError, StaleSerial
from fabric_core.serials import NO_SERIAL, DocumentKey, require_applicable
from fabric_core.settings import DEFAULT_HEARTBEAT_S
from fabric_core.signing import VerifyKey, open_envelope
from fabric_core.wire import EffectiveDocument, Mode, MqttCredentials

log = logging.getLogger(__name__)

DEFAULT_MODE: Mode = "pull"
"""What an agent does before it holds any document: it can only ask."""

TRUSTED_FOR_GROUP_CHANGE = frozenset({"heartbeat", "config"})
"""Sources that are the manager answering this agent over HTTP, authenticated by its secret."""


Listener = Callable[[EffectiveDocument], None]
"""Called with each document once it is applied and stored."""

CredentialsListener = Callable[[MqttCredentials], None]
"""Called with new broker credentials once the identity holds them."""

OutcomeListener = Callable[["ApplyOutcome"], None]
"""Called with what became of every offered envelope (the agent's own log of events)."""


class Outcome(StrEnum):
    APPLIED = "applied"
    STALE = "stale"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class ApplyOutcome:
    """What became of one offered envelope."""

    status: Outcome
    source: str
    serial: int | None = None
    """The offered serial, when the document got far enough to tell."""
    reason: str | None = None
    document: EffectiveDocument | None = None

    @property
    def applied(self) -> bool:
        return self.status is Outcome.APPLIED


class AgentCore:
    """One agent's identity, pinned key and current document; persists through a `StateStore`."""

    def __init__(self, *, identity: Identity, store: StateStore) -> None:
        self.identity = identity
        self._store = store
        # A bad pinned key is a broken identity, not bad input: let it raise at start-up.
        self._key = VerifyKey.from_base64(identity.signing_key.kid, identity.signing_key.public_key)
        self._document: EffectiveDocument | None = None
        self._held_envelope: bytes | None = None
        """The bytes of the document held, as verified: the same bytes again need no second check."""
        self._high_water: dict[DocumentKey, int] = {}
        self._transport: Mode = DEFAULT_MODE
        self._listeners: list[Listener] = []
        self._outcome_listeners: list[OutcomeListener] = []
        self._credentials_listeners: list[CredentialsListener] = []
        self._status = store.load_status() or AgentStatus()
        self._load_current()

    @classmethod
    def from_store(cls, store: StateStore) -> AgentCore:
        identity = store.load_identity()
        if identity is None:
            raise NotEnrolledError("this agent is not enrolled")
        return cls(identity=identity, store=store)

    # --- what the agent holds ----------------------------------------------------------------------

    @property
    def document(self) -> EffectiveDocument | None:
        return self._document

    @property
    def serial(self) -> int:
        return self._document.serial if self._document else NO_SERIAL

    @property
    def location_id(self) -> int | None:
        return self._document.location_id if self._document else None

    @property
    def mode(self) -> Mode:
        return self._document.communication.mode if self._document else DEFAULT_MODE

    @property
    def heartbeat_s(self) -> int:
        return self._document.communication.heartbeat_s if self._document else DEFAULT_HEARTBEAT_S

    @property
    def status(self) -> AgentStatus:
        return self._status.model_copy()

    @property
    def transport(self) -> Mode:
        """How the agent talks to the manager right now (reported in heartbeats); its driver sets it."""
        return self._transport

    @transport.setter
    def transport(self, value: Mode) -> None:
        self._transport = value
        if self._status.transport != value:  # written on changes only: sessions come and go rarely
            self._save_status(transport=value)

    def record_stopped(self) -> None:
        """The agent stops: the status then says it has no transport at all."""
        self._transport = DEFAULT_MODE
        self._save_status(transport=None)

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` after each applied document; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._remove_listener(listener)

    def _remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def add_outcome_listener(self, listener: OutcomeListener) -> Callable[[], None]:
        """Call `listener` with the outcome of every offer (applied, stale or rejected)."""
        self._outcome_listeners.append(listener)
        return lambda: self._remove_outcome_listener(listener)

    def _remove_outcome_listener(self, listener: OutcomeListener) -> None:
        if listener in self._outcome_listeners:
            self._outcome_listeners.remove(listener)

    def add_credentials_listener(self, listener: CredentialsListener) -> Callable[[], None]:
        """Call `listener` after each change of broker credentials; returns a function that removes it."""
        self._credentials_listeners.append(listener)
        return lambda: self._remove_credentials_listener(listener)

    def _remove_credentials_listener(self, listener: CredentialsListener) -> None:
        if listener in self._credentials_listeners:
            self._credentials_listeners.remove(listener)

    # --- broker credentials ------------------------------------------------------------------------

    def adopt_credentials(self, credentials: MqttCredentials, *, source: str) -> bool:
        """Hold `credentials` as the agent's broker account from now on (the manager sent them, over its
        authenticated heartbeat answer or on the agent's own cmd topic); True if they replaced others.

        Unusable ones (a broker URL or topic prefix that cannot be parsed) are logged and dropped, and
        the same ones again change nothing. The password is never logged.
        """
        held = self.identity.mqtt
        problem = credentials_problem(credentials)
        if problem is not None:
            log.warning("dropped broker credentials from %s: %s", source, problem)
            return False
        # The prefix set by hand on an old identity stays with it.
        fresh = StoredMqttCredentials.model_validate(
            {**credentials.model_dump(), "mqtt_prefix": held.mqtt_prefix if held is not None else None}
        )
        if held is not None and fresh == held:
            log.debug("broker credentials from %s: the ones held", source)
            return False
        expiry = fresh.expires_at.isoformat(timespec="seconds") if fresh.expires_at else "never"
        log.info(
            "new broker credentials from %s: user %s on %s, expiring %s",
            source,
            fresh.username,
            ", ".join(fresh.broker_urls),
            expiry,
        )
        self.identity = self.identity.model_copy(update={"mqtt": fresh})
        try:
            self._store.save_identity(self.identity)
        except OSError as exc:
            # Used in memory meanwhile; the manager sends new ones again when these expire.
            log.warning("could not store the new broker credentials: %s", exc)
        for listener in list(self._credentials_listeners):
            try:
                listener(fresh)
            except Exception:
                log.exception("a credentials listener failed")
        return True

    # --- applying documents ------------------------------------------------------------------------

    def offer(
        self,
        envelope: bytes | str | dict[str, Any],
        source: str,
        *,
        expect: DocumentKey | None = None,
    ) -> ApplyOutcome:
        """Apply `envelope` if it may replace the current document; never raises for bad input.

        `expect`: the (group, location) the document must be for (an MQTT config topic names one).
        """
        outcome = self._offer(envelope, source, expect)
        for listener in list(self._outcome_listeners):
            try:
                listener(outcome)
            except Exception:
                # Recording the event (the log spool) must not change what was applied.
                log.exception("an outcome listener failed")
        return outcome

    def _offer(
        self, envelope: bytes | str | dict[str, Any], source: str, expect: DocumentKey | None
    ) -> ApplyOutcome:
        if self._document is not None and envelope == self._held_envelope:
            # The very bytes already verified and held: a retained copy on re-subscribing, the bridge's
            # republish after a broker restart. A comparison instead of a signature check, which is
            # what a fleet reconnecting at once would otherwise spend its CPU on (benchmark 4).
            held = self._document
            if expect is None or (held.group_id, held.location_id) == expect:
                log.debug("ignored serial %d from %s: the document held", held.serial, source)
                return ApplyOutcome(Outcome.STALE, source, serial=held.serial, reason="the document held")
        try:
            doc = self._verify(envelope, source)
            if expect is not None and (doc.group_id, doc.location_id) != expect:
                raise InvalidDocument(
                    f"document is for (group {doc.group_id}, location {doc.location_id}), "
                    f"expected (group {expect[0]}, location {expect[1]})"
                )
            require_applicable(
                offered=doc.serial,
                offered_key=(doc.group_id, doc.location_id),
                current_key=self._key_held(),
                high_water=self._high_water,
            )
        except StaleSerial as exc:
            # Routine: retained MQTT messages and repeated heartbeats re-offer what we hold.
            log.debug("ignored serial %d from %s: %s", exc.offered, source, exc)
            return ApplyOutcome(Outcome.STALE, source, serial=exc.offered, reason=str(exc))
        except (PolicycastError, TypeError, ValueError) as exc:
            # TypeError: open_envelope lets orjson's encode errors through (ints beyond 64 bits, nesting).
            log.warning("rejected a document from %s: %s", source, exc)
            return ApplyOutcome(Outcome.REJECTED, source, reason=str(exc) or type(exc).__name__)
        stored = _as_bytes(envelope)
        try:
            self._store.save_current(stored)
        except OSError as exc:
            # Not applied: the serial held stays the old one, so the manager offers it again.
            log.error("could not store serial %d from %s: %s", doc.serial, source, exc)
            return ApplyOutcome(Outcome.REJECTED, source, serial=doc.serial, reason=f"not stored: {exc}")
        if doc.group_id != self.identity.group_id:
            self._change_group(doc.group_id)
        self._adopt_trust(doc)
        self._hold(doc)
        self._held_envelope = stored
        self._save_status(serial=doc.serial, location_id=doc.location_id, mode=doc.communication.mode)
        log.info(
            "applied serial %d (group %d, location %d) from %s",
            doc.serial,
            doc.group_id,
            doc.location_id,
            source,
        )
        self._notify(doc)
        return ApplyOutcome(Outcome.APPLIED, source, serial=doc.serial, document=doc)

    def _notify(self, doc: EffectiveDocument) -> None:
        for listener in list(self._listeners):
            try:
                listener(doc)
            except Exception:
                # A transport's bug must not undo an apply that is already stored.
                log.exception("a listener failed on serial %d", doc.serial)

    def _verify(self, envelope: bytes | str | dict[str, Any], source: str) -> EffectiveDocument:
        doc = EffectiveDocument.parse(open_envelope(envelope, self._key))
        if doc.group_id != self.identity.group_id and source not in TRUSTED_FOR_GROUP_CHANGE:
            raise InvalidDocument(
                f"document is for group {doc.group_id}, agent is in {self.identity.group_id}"
            )
        return doc

    def _key_held(self) -> DocumentKey | None:
        return None if self._document is None else (self._document.group_id, self._document.location_id)

    def _hold(self, doc: EffectiveDocument) -> None:
        self._document = doc
        key = (doc.group_id, doc.location_id)
        self._high_water[key] = max(doc.serial, self._high_water.get(key, NO_SERIAL))

    def _change_group(self, group_id: int) -> None:
        """The operator moved this agent: remember its new group (the manager said so, signed)."""
        log.info("moved from group %d to group %d by the manager", self.identity.group_id, group_id)
        self.identity = self.identity.model_copy(update={"group_id": group_id})
        try:
            self._store.save_identity(self.identity)
        except OSError as exc:
            log.warning("could not store the new group: %s", exc)

    def _adopt_trust(self, doc: EffectiveDocument, *, persist: bool = True) -> None:
        """Trust the CAs the document names from now on, if they are others (signed by the manager).

        Before the listeners hear of the document: the runtime switches its clients when they do.
        `persist` false (the document read back at start-up): in memory only, so that read-only
        commands (`status`) write nothing; it covers an identity whose saving failed last time.
        """
        named = trust.adopted(doc, self.identity.trusted_cas)
        if named is None:
            return
        log.info(
            "serial %d names other CAs: trusting %s from now on (was %s)",
            doc.serial,
            ", ".join(sorted(trust.hashes(named))),
            ", ".join(sorted(trust.hashes(self.identity.trusted_cas))) or "the system store",
        )
        self.identity = self.identity.model_copy(update={"trusted_cas": named})
        if not persist:
            return
        try:
            self._store.save_identity(self.identity)
        except OSError as exc:
            # Trusted in memory meanwhile; the document held brings them back at the next start.
            log.warning("could not store the new CAs: %s", exc)

    def _load_current(self) -> None:
        data = self._store.load_current()
        if data is None:
            return
        try:
            # Verified again: the file could have been edited or torn by something other than us.
            doc = self._verify(data, "disk")
            self._hold(doc)
            self._held_envelope = data
            self._adopt_trust(doc, persist=False)
        except (PolicycastError, TypeError, ValueError) as exc:
            log.warning("ignoring the stored document, starting from no serial: %s", exc)

    # --- heartbeat bookkeeping ---------------------------------------------------------------------

    def record_heartbeat(self, *, at: datetime, next_at: datetime) -> None:
        """Note a successful heartbeat (clears the last error)."""
        self._save_status(last_heartbeat_at=at, next_heartbeat_at=next_at, last_error=None)

    def record_error(self, *, error: str, next_at: datetime) -> None:
        """Note a failed exchange with the manager."""
        self._save_status(last_error=error, next_heartbeat_at=next_at)

    def _save_status(self, **changes: Any) -> None:
        base = {"serial": self.serial, "location_id": self.location_id, "mode": self.mode}
        self._status = self._status.model_copy(update={**base, **changes})
        try:
            self._store.save_status(self._status)
        except OSError as exc:
            # The status is informational; failing to write it must not stop the agent.
            log.warning("could not store the agent status: %s", exc)


def _as_bytes(envelope: bytes | str | dict[str, Any]) -> bytes:
    if isinstance(envelope, bytes):
        return envelope
    if isinstance(envelope, str):
        return envelope.encode()
    return canonical_json(envelope)
