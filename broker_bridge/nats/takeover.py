"""The takeover guard: an agent's MQTT client id belongs to that agent, on NATS too.

Mosquitto binds an agent's client id to its account. NATS user JWTs cannot: any valid agent JWT may
connect under any client id, and NATS's MQTT hands the session to the newest connection, so one
agent could take another's session over (the victim is disconnected). The guard closes that hole
from the outside: the lease-holding bridge (`NatsEngine.watch`) subscribes, as the system user, to
the account's connect events (`$SYS.ACCOUNT.<account>.CONNECT`, sent cluster-wide) and judges each
MQTT connection (`judge`, pure): an agent's key (the JWT's subject, which the server verified; the
event's `user` is only the MQTT username, which the client chooses) must connect under that agent's
own id, as on Mosquitto. Anything else is kicked off its node (`$SYS.REQ.SERVER.<id>.KICK`,
nats-server 2.10+); an agent that does it again within `REPEAT_WINDOW_S` is compromised and its key is
revoked (`NatsEngine.quarantine`: the account JWT's revocation list, pushed to every node). The
victim's agent reconnects by its own back-off and gets its session back. Each is logged as a
security warning naming both agent ids (never a JWT).

Limits: the guard runs only while a bridge holds the lease; with no bridge (or between a lease
holder's death and the next one's `watch`, up to the lease TTL) a takeover stands until the victim's
reconnect takes the session back, and a stolen JWT is good until it expires
(`nats_credentials_ttl_s`) or its agent is revoked. A takeover-and-kick takes one event round trip
(~0.1 s measured); the taker holds the session that long.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from broker_bridge.errors import BrokerUnavailable
from broker_bridge.nats import jwt
from broker_bridge.nats.credentials import system_user_jwt
from broker_bridge.nats.sysclient import NatsError, SystemClient

if TYPE_CHECKING:
    from broker_bridge.nats.engine import NatsEngine

log = logging.getLogger(__name__)

CONNECT_EVENTS = "$SYS.ACCOUNT.{account}.CONNECT"
KICK = "$SYS.REQ.SERVER.{server}.KICK"
REPEAT_WINDOW_S = 300.0
"""A second takeover by the same key within this long revokes it (one may be a misconfiguration)."""
READ_TIMEOUT_S = 0.5
"""How long one read waits: the bound on noticing a stop or a lapsed lease."""
RETRY_MAX_S = 10.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one connection. `kick`: the connection `cid` on `server`, whose key
    `offender_key` (agent `offender`, None when its JWT says nothing) holds `client_id`."""

    action: Literal["allow", "kick"]
    reason: str
    client_id: str = ""
    offender: str | None = None
    offender_key: str | None = None
    server: str = ""
    cid: int = 0


def judge(
    event: Mapping[str, Any], *, account: str, agent_key: Callable[[str], str], bridge_key: str
) -> Verdict:
    """The verdict on one connect event (the JSON of `io.nats.server.advisory.v1.client_connect`).

    Allowed: connections that are not MQTT, not in `account`, or the bridge's (`bridge_key`; its
    client id is random), and an agent key under its own agent's id (`agent_key(client_id)`). Kicked:
    any other key under any client id (an agent's id taken by another, or by no agent at all)."""
    client, server = event.get("client") or {}, event.get("server") or {}
    client_id = client.get("client_id") or ""
    if client.get("client_type") != "mqtt" or not client_id:
        return Verdict("allow", "not an MQTT connection")
    if client.get("acc") != account:
        return Verdict("allow", "another account")
    kick = Verdict("kick", "", client_id, server=str(server.get("id", "")), cid=int(client.get("id") or 0))
    try:
        claims = jwt.decode(str(client.get("jwt") or ""), "user")
    except jwt.JwtError as exc:
        return replace(kick, reason=f"no readable user JWT ({exc})")
    key = claims.get("sub")
    if key == bridge_key:
        return Verdict("allow", "the bridge")
    if not isinstance(key, str) or claims.get("iss") != account:
        return replace(kick, reason="a JWT not issued by the account")
    name = claims.get("name")
    offender = name if isinstance(name, str) and name else None
    if key == agent_key(client_id):
        return Verdict("allow", "the agent's own client id", client_id, offender, key)
    return replace(kick, reason="another key under this client id", offender=offender, offender_key=key)


@dataclass
class Strikes:
    """Takeovers per key: the second within `window_s` of the first is a repeat."""

    window_s: float = REPEAT_WINDOW_S
    _last: dict[str, float] = field(default_factory=dict)

    def record(self, key: str, now: float) -> bool:
        """Count a takeover by `key` at `now` (monotonic); True if it is a repeat."""
        self._last = {k: t for k, t in self._last.items() if now - t <= self.window_s}
        repeat = key in self._last
        self._last[key] = now
        return repeat


class TakeoverGuard:
    """The guard's thread: one system connection (failing over among `nats_urls`), reading connect
    events until `stop`, or until the lease deadline given to `extend` passes without renewal."""

    def __init__(self, engine: NatsEngine, *, until: float) -> None:
        self.engine = engine
        keys = engine.keys
        self.account = keys.account.public_key
        self._agent_key = lru_cache(maxsize=4096)(lambda agent_id: keys.agent_user(agent_id).public_key)
        self._bridge_key = keys.bridge_user().public_key
        self.strikes = Strikes()
        self.ready = threading.Event()
        """Set while subscribed to the connect events."""
        self.allowed: deque[str] = deque(maxlen=1000)
        """The client ids of the latest allowed MQTT connections."""
        self.kicked: deque[Verdict] = deque(maxlen=1000)
        self.revoked: deque[str] = deque(maxlen=1000)
        """The latest verdicts carried out (kicks, revoked keys): for logs' readers and tests."""
        self._until = until
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="nats-takeover-guard", daemon=True)

    def start(self) -> TakeoverGuard:
        self._thread.start()
        return self

    def extend(self, until: float) -> None:
        """Keep watching until `until` (monotonic): the lease's new deadline."""
        self._until = max(self._until, until)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until `condition` holds after a verdict (tests)."""
        with self._cond:
            return self._cond.wait_for(condition, timeout)

    def _lapsed(self) -> bool:
        return self._stop.is_set() or time.monotonic() > self._until

    def _run(self) -> None:
        failures = 0
        while not self._lapsed():
            try:
                self._watch()
                failures = 0
            except (OSError, NatsError) as exc:
                self.ready.clear()
                failures += 1
                delay = min(RETRY_MAX_S, 0.2 * 2**failures)
                log.warning("takeover guard lost its NATS connection (%s); again in %.1fs", exc, delay)
                self._stop.wait(delay)
        self.ready.clear()
        log.info("takeover guard stopped (%s)", "stopped" if self._stop.is_set() else "lease lapsed")

    def _watch(self) -> None:
        engine = self.engine
        failures = []
        for url in engine.settings.nats_url_list:
            try:
                client = SystemClient.connect(
                    url,
                    user_jwt=system_user_jwt(engine.keys),
                    user_key=engine.keys.system_user,
                    ssl_context=engine._context(),
                    name="policycast-takeover-guard",
                )
                break
            except (OSError, NatsError) as exc:
                failures.append(f"{url}: {exc}")
        else:
            raise NatsError("no NATS node took the guard's connection: " + "; ".join(failures))
        with client:
            client.subscribe(CONNECT_EVENTS.format(account=self.account))
            self.ready.set()
            log.info("takeover guard watching the account's connections through %s", url)
            while not self._lapsed():
                message = client.next_message(READ_TIMEOUT_S)
                if message is not None:
                    self._handle(client, message.payload)

    def _handle(self, client: SystemClient, payload: bytes) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        verdict = judge(event, account=self.account, agent_key=self._agent_key, bridge_key=self._bridge_key)
        if verdict.action == "kick":
            self._kick(client, verdict)
        elif verdict.client_id:
            self.allowed.append(verdict.client_id)
        with self._cond:
            self._cond.notify_all()

    def _kick(self, client: SystemClient, verdict: Verdict) -> None:
        offender = verdict.offender or "(not an agent)"
        log.warning(
            "SECURITY: agent %s's client id was taken by %s (%s, connection %d on server %s): kicking it",
            verdict.client_id,
            offender,
            verdict.reason,
            verdict.cid,
            verdict.server,
        )
        answer = client.request(KICK.format(server=verdict.server), json.dumps({"cid": verdict.cid}).encode())
        error = _error(answer.payload) if answer is not None else "no answer"
        if error:
            # Gone already (the victim took its session back) or the node is away: a repeat still counts.
            log.warning("kicking connection %d on server %s: %s", verdict.cid, verdict.server, error)
        with self._cond:
            self.kicked.append(verdict)
        key = verdict.offender_key
        if key is None or not self.strikes.record(key, time.monotonic()):
            return
        log.warning(
            "SECURITY: %s took agent %s's client id again within %.0fs: revoking %s's key (compromised)",
            offender,
            verdict.client_id,
            self.strikes.window_s,
            offender,
        )
        try:
            self.engine.quarantine(key)
        except BrokerUnavailable as exc:  # still a repeat offender: its next takeover tries again
            log.error("revoking %s's key failed (%s); it is revoked at its next takeover", offender, exc)
            return
        with self._cond:
            self.revoked.append(key)


def _error(payload: bytes) -> str | None:
    try:
        answer = json.loads(payload)
    except ValueError:
        return "an unreadable answer"
    error = answer.get("error") if isinstance(answer, dict) else None
    return str(error.get("description", error)) if isinstance(error, dict) else None
