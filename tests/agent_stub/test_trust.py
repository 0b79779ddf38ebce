"""The CAs an agent trusts: the pin settled from a join token, the pinned CA kept from a bundle, and the
trust that verified documents bring (a CA rotation), followed by the HTTPS client and the MQTT link."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import pytest

from agent_stub import trust
from agent_stub.broker_account import link_options
from agent_stub.core import AgentCore
from agent_stub.errors import TrustError
from agent_stub.manager_client import ManagerClient
from agent_stub.runtime import AgentRuntime
from agent_stub.state import Identity, MemoryStateStore
from fabric_core.settings import AgentSettings
from fabric_core.signing import SigningKey
from fabric_core.tls import ManagerCA
from fabric_core.wire import EffectiveDocument
from tests.agent_stub.conftest import WAIT_S, make_doc, make_identity, running
from tests.agent_stub.fakes import Broker, FakeManager
from tests.support.waiting import wait_for_async

OLD, NEW = ManagerCA.generate(), ManagerCA.generate()
OLD_PEM, NEW_PEM = OLD.certificate_pem.decode(), NEW.certificate_pem.decode()


def _doc(*cas: str, serial: int = 1, mode: str = "pull") -> dict[str, Any]:
    doc = make_doc(serial=serial, mode=mode)
    if cas:
        doc["trust"] = {"ca_certificates": list(cas)}
    return doc


# --- the pin -----------------------------------------------------------------------------------------


def test_the_pin_comes_from_the_join_token_or_the_option() -> None:
    assert trust.resolve_pin(f"pcet_abc.{OLD.hash}", None) == ("pcet_abc", OLD.hash)
    assert trust.resolve_pin("pcet_abc", OLD.hash.upper()) == ("pcet_abc", OLD.hash)
    assert trust.resolve_pin(f"pcet_abc.{OLD.hash}", OLD.hash) == ("pcet_abc", OLD.hash)
    assert trust.resolve_pin("pcet_abc", None) == ("pcet_abc", None)


@pytest.mark.parametrize(
    ("token", "option", "message"),
    [
        (f"pcet_abc.{OLD.hash}", NEW.hash, f"the join token pins {OLD.hash} but --ca-hash says {NEW.hash}"),
        ("pcet_abc", "md5:1234", "a CA hash looks like sha256:<64 hex digits>"),
        ("pcet_abc.sha256:zz", None, "a CA hash looks like"),
    ],
    ids=["token-and-option-disagree", "not-sha256", "not-hex"],  # the CAs are made per run
)
def test_a_pin_that_cannot_be_settled_is_a_trust_error(token: str, option: str | None, message: str) -> None:
    with pytest.raises(TrustError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trust.resolve_pin(token, option)


def test_only_the_pinned_ca_is_kept_from_the_bundle() -> None:
    bundle = OLD.certificate_pem + NEW.certificate_pem
    assert trust.pinned_from_bundle(bundle, NEW.hash, server="https://m.test") == [NEW_PEM]


def test_a_bundle_without_the_pinned_ca_is_refused_naming_both() -> None:
    other = ManagerCA.generate().hash
    bundle = OLD.certificate_pem + NEW.certificate_pem
    with pytest.raises(TrustError) as raised:
        trust.pinned_from_bundle(bundle, other, server="https://m.test")
    message = str(raised.value)
    assert f"offers {OLD.hash}, {NEW.hash}, not the pinned CA {other}" in message
    assert message.endswith("refusing: nothing was sent")
    with pytest.raises(TrustError, match="offers no certificate"):
        trust.pinned_from_bundle(b"<html>hello</html>", other, server="https://m.test")


def test_the_ca_bundle_is_fetched_without_credentials() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=OLD.certificate_pem)

    pinned = asyncio.run(
        trust.pin("https://m.test", OLD.hash, timeout_s=1, transport=httpx.MockTransport(answer))
    )
    assert pinned == [OLD_PEM]
    [request] = seen
    assert (request.method, str(request.url)) == ("GET", "https://m.test/agent/v1/ca")
    assert "Authorization" not in request.headers


def test_a_manager_naming_no_ca_is_a_trust_error() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(404, json={"detail": "no CA"}))
    with pytest.raises(TrustError, match="offers no CA \\(HTTP 404"):
        asyncio.run(trust.pin("https://m.test", OLD.hash, timeout_s=1, transport=transport))


# --- contexts ----------------------------------------------------------------------------------------


def test_one_context_per_set_of_cas_and_none_without() -> None:
    assert trust.context_for([]) is None
    first = trust.context_for([OLD_PEM])
    assert first is not None and trust.context_for([OLD_PEM]) is first  # shared, e.g. by a fleet
    assert trust.context_for([OLD_PEM, NEW_PEM]) is not first
    assert len(first.get_ca_certs()) == 1


def test_the_mqtt_link_trusts_the_identity_cas_only(signing_key: SigningKey, settings: AgentSettings) -> None:
    identity = make_identity(signing_key, mqtt_url="mqtts://broker.test:8883")
    assert link_options(identity, settings).ssl_context is None  # nothing pinned: the system store
    pinned = identity.model_copy(update={"trusted_cas": [OLD_PEM]})
    assert link_options(pinned, settings).ssl_context is trust.context_for([OLD_PEM])


def test_an_owned_pool_switches_trust_and_a_shared_one_is_its_owner_s() -> None:
    async def scenario() -> None:
        client = ManagerClient.for_agent(
            server="https://m.test",
            agent_id="a",
            secret="s",
            timeout_s=0.01,
            ssl_context=trust.context_for([OLD_PEM]),
        )
        old = client._http
        client.use_ssl_context(trust.context_for([NEW_PEM]))
        assert client._http is not old
        await wait_for_async(lambda: old.is_closed, timeout=WAIT_S, what="the old pool closed")
        await client.aclose()
        assert client._http.is_closed

        async with httpx.AsyncClient() as shared:
            lent = ManagerClient(server="https://m.test", agent_id="a", secret="s", http=shared)
            lent.use_ssl_context(trust.context_for([NEW_PEM]))
            assert lent._http is shared

    asyncio.run(scenario())


# --- trust from documents ----------------------------------------------------------------------------


def _parsed(doc: dict[str, Any]) -> EffectiveDocument:
    return EffectiveDocument.parse(doc)


def test_what_a_document_names_when_it_is_another_set() -> None:
    assert trust.adopted(_parsed(_doc()), [OLD_PEM]) is None
    assert trust.adopted(_parsed(_doc(OLD_PEM, NEW_PEM)), [OLD_PEM]) == [OLD_PEM, NEW_PEM]
    assert trust.adopted(_parsed(_doc(OLD_PEM + NEW_PEM)), []) == [OLD_PEM, NEW_PEM]  # a bundle in one
    assert trust.adopted(_parsed(_doc(NEW_PEM)), [OLD_PEM, NEW_PEM]) == [NEW_PEM]


def test_the_same_cas_in_another_order_or_form_are_no_change() -> None:
    assert trust.adopted(_parsed(_doc(OLD_PEM, NEW_PEM)), [OLD_PEM, NEW_PEM]) is None
    assert trust.adopted(_parsed(_doc(NEW_PEM, OLD_PEM)), [OLD_PEM, NEW_PEM]) is None
    assert trust.adopted(_parsed(_doc("\n" + OLD_PEM.strip() + "\n\n")), [OLD_PEM]) is None


@pytest.mark.parametrize(
    "named",
    ["not a certificate", "-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----", "é"],
    ids=["no-pem", "bad-der", "not-ascii"],
)
def test_unusable_cas_are_not_adopted(named: str) -> None:
    assert trust.adopted(_parsed(_doc(named)), [OLD_PEM]) is None
    assert trust.adopted(_parsed(_doc(NEW_PEM, named)), [OLD_PEM]) is None


class _CountingStore(MemoryStateStore):
    def __init__(self, identity: Identity) -> None:
        super().__init__(identity)
        self.identity_saves = 0

    def save_identity(self, identity: Identity) -> None:
        self.identity_saves += 1
        super().save_identity(identity)


def _core(key: SigningKey, cas: list[str]) -> tuple[AgentCore, _CountingStore]:
    identity = make_identity(key).model_copy(update={"trusted_cas": cas})
    store = _CountingStore(identity)
    return AgentCore(identity=identity, store=store), store


def test_a_rotation_replaces_the_trust_as_documents_say(signing_key: SigningKey) -> None:
    core, store = _core(signing_key, [OLD_PEM])

    assert core.offer(signing_key.sign_envelope(_doc(OLD_PEM, serial=1)), "heartbeat").applied
    assert store.identity_saves == 0  # the same CA: nothing to write

    assert core.offer(signing_key.sign_envelope(_doc(OLD_PEM, NEW_PEM, serial=2)), "mqtt").applied
    assert core.identity.trusted_cas == [OLD_PEM, NEW_PEM]
    assert store.identity is not None and store.identity.trusted_cas == [OLD_PEM, NEW_PEM]

    assert core.offer(signing_key.sign_envelope(_doc(NEW_PEM, serial=3)), "heartbeat").applied
    assert store.identity.trusted_cas == [NEW_PEM]
    assert store.identity_saves == 2


def test_a_document_without_trust_or_with_unusable_trust_leaves_it(signing_key: SigningKey) -> None:
    core, store = _core(signing_key, [OLD_PEM])
    assert core.offer(signing_key.sign_envelope(_doc(serial=1)), "heartbeat").applied
    assert core.offer(signing_key.sign_envelope(_doc("garbage", serial=2)), "heartbeat").applied
    assert core.identity.trusted_cas == [OLD_PEM] and store.identity_saves == 0


def test_a_forged_document_changes_no_trust(signing_key: SigningKey) -> None:
    core, store = _core(signing_key, [OLD_PEM])
    forged = SigningKey.generate().sign_envelope(_doc(NEW_PEM, serial=5))
    assert not core.offer(forged, "heartbeat").applied
    assert core.identity.trusted_cas == [OLD_PEM] and store.identity_saves == 0


def test_an_identity_without_trust_takes_what_documents_name(signing_key: SigningKey) -> None:
    """Enrolled over plain HTTP: the manager's signed word is still better than the system store."""
    core, _ = _core(signing_key, [])
    assert core.offer(signing_key.sign_envelope(_doc(NEW_PEM)), "heartbeat").applied
    assert core.identity.trusted_cas == [NEW_PEM]


def test_the_document_held_at_start_sets_the_trust_in_memory_only(signing_key: SigningKey) -> None:
    """Its identity could not be saved last time; `status` and the like must not write either."""
    identity = make_identity(signing_key).model_copy(update={"trusted_cas": [OLD_PEM]})
    store = _CountingStore(identity)
    store.save_current(signing_key.sign_envelope(_doc(NEW_PEM, serial=4)))
    core = AgentCore(identity=identity, store=store)
    assert core.identity.trusted_cas == [NEW_PEM]
    assert store.identity_saves == 0


# --- the runtime follows ---------------------------------------------------------------------------


class _TrustingManager(FakeManager):
    """A fake manager whose client, like `ManagerClient`, can be told what to trust."""

    def __init__(self, envelope: bytes) -> None:
        super().__init__(envelope)
        self.contexts: list[object] = []

    def use_ssl_context(self, context: object) -> None:
        self.contexts.append(context)


def test_the_runtime_hands_new_cas_to_its_client_and_the_next_link(
    signing_key: SigningKey, push_settings: AgentSettings
) -> None:
    identity = make_identity(signing_key, mqtt_url="mqtts://broker.test:8883")
    identity = identity.model_copy(update={"trusted_cas": [OLD_PEM]})
    core = AgentCore(identity=identity, store=MemoryStateStore(identity))
    manager = _TrustingManager(signing_key.sign_envelope(_doc(OLD_PEM, serial=1, mode="push")))
    broker = Broker()
    runtime = AgentRuntime(core, manager, push_settings, broker.factory, rng=random.Random(3))

    async def scenario() -> None:
        async with running(runtime.run, stop_within=10.0):
            await wait_for_async(lambda: runtime.push.connected, timeout=WAIT_S, what="a push session")
            assert broker.link.options.ssl_context is trust.context_for([OLD_PEM])
            assert manager.contexts == []  # the same CA: the client keeps its pool

            manager.envelope = signing_key.sign_envelope(_doc(OLD_PEM, NEW_PEM, serial=2, mode="push"))
            runtime.update_now()
            both = trust.context_for([OLD_PEM, NEW_PEM])
            await wait_for_async(lambda: manager.contexts == [both], timeout=WAIT_S, what="the client told")
            assert len(broker.links) == 1  # the session up stays up

            broker.link.drop()  # the broker restarts with a certificate of the new CA
            await wait_for_async(
                lambda: len(broker.links) == 2 and runtime.push.connected, timeout=WAIT_S, what="a new link"
            )
            assert broker.link.options.ssl_context is both

    asyncio.run(scenario())
