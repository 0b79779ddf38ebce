"""What a simulated fleet trusts: one CA for all its agents (they enrol with one manager), settled once.

The plan may bring the manager's CA as a file (`--ca-file`: what the admin API is verified with too) or
its hash (`--ca-hash`); join tokens bring the hash as well (`pcet_….sha256:…`, what the admin API hands
out). `initial_trust` settles what the admin API is verified with before any token exists: the file,
else the CA the hash pins. `fleet_trust` then settles what every agent trusts, pinning the CA once as a
real agent does (`agent_stub.trust.pin`), and strips the hash from the tokens. Over http:// nothing is
trusted (a benchmark's plain stack). Agents reusing identities from an earlier run keep the trust they
enrolled with.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent_stub.errors import TrustError
from agent_stub.simulator.plan import FleetPlan, SimIdentity
from agent_stub.trust import hashes, pin, resolve_pin
from fabric_core.tls import split_certificates


async def initial_trust(plan: FleetPlan, *, timeout_s: float) -> list[str]:
    """The CAs to verify the manager with before the tokens are known: `--ca-file`, else the CA
    `--ca-hash` pins, else none (the system store)."""
    if plan.ca_file is not None:
        return read_ca_file(plan)
    given = _given_hash(plan)
    if given is not None and plan.server.startswith("https://"):
        return await pin(plan.server, given, timeout_s=timeout_s)
    return []


def _given_hash(plan: FleetPlan) -> str | None:
    return None if plan.ca_hash is None else resolve_pin("", plan.ca_hash)[1]


def read_ca_file(plan: FleetPlan) -> list[str]:
    assert plan.ca_file is not None
    try:
        certificates = split_certificates(plan.ca_file.read_bytes())
    except OSError as exc:
        raise TrustError(f"cannot read --ca-file {plan.ca_file}: {exc}") from exc
    if not certificates:
        raise TrustError(f"--ca-file {plan.ca_file} holds no PEM certificate")
    return [certificate.decode("ascii") for certificate in certificates]


async def fleet_trust(
    plan: FleetPlan,
    tokens: Sequence[str],
    *,
    initial: Sequence[str],
    known: Sequence[SimIdentity],
    timeout_s: float,
) -> tuple[list[str], list[str]]:
    """(the tokens without their CA hash, the CAs every agent of the fleet trusts).

    Raises TrustError when the tokens and `--ca-hash` pin different CAs, when an https:// manager
    leaves nothing to pin, or when the manager does not offer the pinned CA (nothing was sent then).
    """
    given = _given_hash(plan)
    pins = {given} if given is not None else set()
    bare: list[str] = []
    for token in tokens:
        stripped, pinned = resolve_pin(token, None)
        bare.append(stripped)
        if pinned is not None:
            pins.add(pinned)
    if len(pins) > 1:
        raise TrustError(
            f"the tokens and --ca-hash pin different CAs ({', '.join(sorted(pins))}): one manager, one CA"
        )
    if not plan.server.startswith("https://"):
        return bare, []
    if pins:
        pinned = next(iter(pins))
        kept = [pem for pem in initial if pinned in hashes([pem])]
        return bare, kept or await pin(plan.server, pinned, timeout_s=timeout_s)
    if initial:
        return bare, list(initial)
    if known and not tokens:
        return bare, list(known[0].identity.trusted_cas)
    raise TrustError(
        f"{plan.server} is https:// but nothing says which CA to trust: use join tokens (…sha256:…), "
        "--ca-hash or --ca-file"
    )
