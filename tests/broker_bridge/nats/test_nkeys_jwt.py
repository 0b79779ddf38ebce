"""nkeys and NATS JWTs (`broker_bridge.nats.nkeys`, `.jwt`): vectors from nats-server's own test files,
round trips, and what decoding refuses."""

from __future__ import annotations

import time

import pytest

from broker_bridge.nats import jwt
from broker_bridge.nats.nkeys import KeyKind, KeyPair, NkeyError, decode_public, kind_of, verify

# nats-server's test/configs/nkeys/test.seed and op.jwt: the operator seed and the key it signs with.
OPERATOR_SEED = "SOAFYNORQLQFJYBYNUGC5D7SH2MXMUX5BFEWWGHN3EK4VGG5TPT5DZP7QU"
OPERATOR_PUBLIC = "OCAT33MTVU2VUOIMGNGUNXJ66AH2RLSDAF3MUBCYAY5QMIL65NQM6XQG"
# server/configs/one.creds: a user seed, and a user JWT its account signed (jti as the Go library made it).
USER_SEED = "SUAPCDMU5TSHHLWUUZSOUABJXP2GXRCZVEOVWPSVM5XRSXYGQMRRFDYNMY"
USER_PUBLIC = "UDCIBGGGHCJBQPOO4SCJJBHZDR37NQGGCIWMNG2DDAKJ6WMKBMAKXIMO"
USER_JWT = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOiJHRUNQVEpISE1TM01DTUtMVFBHWUdBTzQ1R1E2TjZR"
    "UFlXUTRHUExBRUIzM1ZDUkpOUlZRIiwiaWF0IjoxNjE2MjQ3MjMyLCJpc3MiOiJBQlZSWktKNlo3TklNUElZSlJDSEVZRlJVTzdF"
    "Tk42TldPS1FERkxGREZWUFNNMzZVUFgyVUNQUCIsIm5hbWUiOiJvbmUiLCJzdWIiOiJVRENJQkdHR0hDSkJRUE9PNFNDSkpCSFpE"
    "UjM3TlFHR0NJV01ORzJEREFLSjZXTUtCTUFLWElNTyIsIm5hdHMiOnsicHViIjp7fSwic3ViIjp7fSwic3VicyI6LTEsImRhdGEi"
    "Oi0xLCJwYXlsb2FkIjotMSwidHlwZSI6InVzZXIiLCJ2ZXJzaW9uIjoyfX0.VLhSDtGZEF_jdvgmhgkdISXAt5wFMMZxxwm5w8Urs"
    "nlM1hkUvtxBlTe4IP0xJIf4xf8JOR2Bmf73xUGJKUZECQ"
)


def test_seeds_give_the_public_keys_nats_server_gives_them() -> None:
    operator = KeyPair.from_seed(OPERATOR_SEED)
    assert operator.kind is KeyKind.OPERATOR
    assert operator.public_key == OPERATOR_PUBLIC
    assert operator.seed == OPERATOR_SEED
    user = KeyPair.from_seed(USER_SEED)
    assert (user.kind, user.public_key) == (KeyKind.USER, USER_PUBLIC)


def test_a_jwt_minted_by_nats_tooling_decodes_and_its_jti_is_the_one_we_compute() -> None:
    claims = jwt.decode(USER_JWT, "user")
    assert claims["sub"] == USER_PUBLIC
    assert claims["nats"]["type"] == "user"
    assert jwt.claims_id(claims) == claims["jti"] == "GECPTJHHMS3MCMKLTPGYGAO45GQ6N6QPYWQ4GPLAEB33VCRJNRVQ"


def test_keys_round_trip_and_corruption_is_caught() -> None:
    for kind in KeyKind:
        pair = KeyPair.generate(kind)
        assert KeyPair.from_seed(pair.seed).public_key == pair.public_key
        assert kind_of(pair.public_key) is kind
        assert decode_public(pair.public_key, kind) == pair.public_raw
        assert verify(pair.public_key, b"data", pair.sign(b"data"))
        assert not verify(pair.public_key, b"other", pair.sign(b"data"))
    public = KeyPair.generate(KeyKind.USER).public_key
    flipped = public[:10] + ("A" if public[10] != "A" else "B") + public[11:]
    with pytest.raises(NkeyError, match="checksum"):
        decode_public(flipped)
    with pytest.raises(NkeyError, match="kind"):
        decode_public(public, KeyKind.ACCOUNT)
    secret = KeyPair.generate(KeyKind.USER)
    assert secret.seed not in repr(secret)  # repr never shows the seed


def test_derived_keys_are_stable_and_distinct() -> None:
    account = KeyPair.generate(KeyKind.ACCOUNT)
    a1 = KeyPair.derived(account, "agent:a1", KeyKind.USER)
    assert (
        a1.public_key == KeyPair.derived(KeyPair.from_seed(account.seed), "agent:a1", KeyKind.USER).public_key
    )
    assert a1.public_key != KeyPair.derived(account, "agent:a2", KeyKind.USER).public_key
    assert a1.public_key.startswith("U")


def test_minted_user_jwt_round_trips_with_its_claims() -> None:
    account = KeyPair.generate(KeyKind.ACCOUNT)
    user = KeyPair.generate(KeyKind.USER)
    claims = jwt.user_claims(publish=["a.b"], subscribe=["c.*"], bearer=True, connection_types=["MQTT"])
    token = jwt.encode(account, subject=user.public_key, name="a1", nats=claims, expires=2_000_000_000)
    header = token.split(".")[0]
    assert jwt._unb64(header) == b'{"typ":"JWT","alg":"ed25519-nkey"}'
    decoded = jwt.decode(token, "user", now=time.time())
    assert decoded["iss"] == account.public_key and decoded["sub"] == user.public_key
    assert decoded["exp"] == 2_000_000_000 and decoded["jti"] == jwt.claims_id(decoded)
    assert decoded["nats"] == {
        "pub": {"allow": ["a.b"]},
        "sub": {"allow": ["c.*"]},
        "subs": -1,
        "data": -1,
        "payload": -1,
        "bearer_token": True,
        "allowed_connection_types": ["MQTT"],
        "type": "user",
        "version": 2,
    }


def test_decode_refuses_tampering_wrong_kinds_and_expiry() -> None:
    account = KeyPair.generate(KeyKind.ACCOUNT)
    user = KeyPair.generate(KeyKind.USER)
    token = jwt.encode(
        account,
        subject=user.public_key,
        name="u",
        nats=jwt.user_claims(publish=[], subscribe=None, bearer=True),
    )
    head, body, signature = token.split(".")
    with pytest.raises(jwt.JwtError, match="signature"):
        jwt.decode(f"{head}.{body}.{signature[:-4]}AAAA")
    with pytest.raises(jwt.JwtError, match="account JWT was expected"):
        jwt.decode(token, "account")
    # A user JWT signed by an operator key is not one NATS would take.
    operator = KeyPair.generate(KeyKind.OPERATOR)
    odd = jwt.encode(
        operator,
        subject=user.public_key,
        name="u",
        nats=jwt.user_claims(publish=None, subscribe=None, bearer=True),
    )
    with pytest.raises(jwt.JwtError, match="issued by a operator key"):
        jwt.decode(odd, "user")
    expired = jwt.encode(
        account, subject=user.public_key, name="u", nats={"type": "user", "version": 2}, expires=1
    )
    with pytest.raises(jwt.JwtError, match="expired"):
        jwt.decode(expired, "user", now=time.time())


def test_an_empty_allow_list_denies_everything_rather_than_nothing() -> None:
    # NATS omits an empty allow-list, which would mean "no restriction".
    assert jwt.user_claims(publish=[], subscribe=[], bearer=True)["pub"] == {"deny": [">"]}


def test_minting_an_agent_jwt_is_cheap() -> None:
    account = KeyPair.generate(KeyKind.ACCOUNT)
    user = KeyPair.generate(KeyKind.USER)
    claims = jwt.user_claims(publish=["a"], subscribe=["b", "c"], bearer=True, connection_types=["MQTT"])
    rounds = 500
    began = time.perf_counter()
    for _ in range(rounds):
        jwt.encode(account, subject=user.public_key, name="a1", nats=claims, expires=2_000_000_000)
    per_mint_us = (time.perf_counter() - began) / rounds * 1e6
    print(f"JWT mint: {per_mint_us:.0f} us")
    assert per_mint_us < 5_000  # a bound against pathologies, not a benchmark
