"""Broker accounts for agents: what the bridge asks Mosquitto's dynamic security to do.

Every function is idempotent and safe to repeat after a crash half-way. Each sends one or two control
messages (`control.control`), so provisioning an agent costs one round trip in the common case.

Seen on Mosquitto 2.0.11: every change to a client (password, roles, enable/disable, delete) and deleting
a role a client holds disconnects that client at once ("Administrative action", 0x98); it reconnects and
gets its new rights. Failed commands (already exists, not found) change nothing and disconnect no one.
So these functions change an account only when something differs, except where asked to reset it.
"""

from __future__ import annotations

import logging
from typing import Any

from broker_bridge.broker import BrokerLink
from broker_bridge.mosquitto import dynsec
from broker_bridge.mosquitto.control import control
from fabric_core.topics import state_topic

log = logging.getLogger(__name__)


def _tolerate(responses: list[dict[str, Any]], *, exists: bool = False, missing: bool = False) -> None:
    """Raise the first error that is not an expected "already exists" / "not found"."""
    for response in responses:
        error = dynsec.error_of(response)
        if error is None or (exists and error.already_exists) or (missing and error.not_found):
            continue
        raise error


def ensure_group_role(link: BrokerLink, prefix: str, group_id: str | int) -> str:
    """Create the role that reads the group's config topics unless it exists; return its name."""
    _tolerate(control(link, [dynsec.group_role(prefix, group_id)]), exists=True)
    return dynsec.group_role_name(group_id)


def provision_agent(
    link: BrokerLink, *, prefix: str, agent_id: str, group_id: str | int, password: str, reset: bool = True
) -> None:
    """Give the agent its broker account: username `agent_id`, bound to client id `agent_id` (no other
    id connects with it), its own role and its group's role.

    Creates whatever is missing. If the account exists, `reset=True` sets its password and roles (one
    command; a connected agent is disconnected and reconnects), `reset=False` only corrects its roles
    when they differ and leaves the password alone (no disconnect when nothing changed: use it to
    re-sync a whole fleet).
    """
    account = dynsec.agent_account(prefix, agent_id, group_id)
    responses = control(link, dynsec.create_account(account, password))
    _tolerate(responses[:-1], exists=True)
    error = dynsec.error_of(responses[-1])
    if error is None:
        log.info("provisioned broker account %s in group %s", agent_id, group_id)
        return
    if not error.already_exists:
        raise error
    _exists(link, account, password, reset=reset)


def provision_agents(
    link: BrokerLink, *, prefix: str, agents: list[tuple[str, str | int, str]], per_message: int = 50
) -> int:
    """`provision_agent` (with `reset=True`) for many agents, `per_message` agents' commands in one
    control message (each group's role once per message); `agents`: (agent id, group id, password).
    Returns how many control messages it sent.

    It saves round trips, not broker work: Mosquitto 2.0.11 rewrites its whole JSON file after every
    command, so a fleet costs O(N^2) either way (docs/performance.md, "Mosquitto: provisioning cost").
    Before the broker starts, `bulk.write_agent_accounts` is O(N).
    """
    messages = 0
    for start in range(0, len(agents), per_message):
        chunk = agents[start : start + per_message]
        accounts = [(dynsec.agent_account(prefix, a, g), password) for a, g, password in chunk]
        groups = {account.group_role.name: account.group_role for account, _ in accounts}
        commands = [dynsec.create_role(role.name, role.acls) for role in groups.values()]
        ends: list[int] = []
        for account, password in accounts:
            commands += dynsec.create_account(account, password, group_role=False)
            ends.append(len(commands) - 1)
        responses = control(link, commands, timeout=10.0 + len(commands) * 0.5)
        messages += 1
        clients = set(ends)
        _tolerate([r for i, r in enumerate(responses) if i not in clients], exists=True)
        for (account, password), end in zip(accounts, ends, strict=True):
            error = dynsec.error_of(responses[end])
            if error is not None and not error.already_exists:
                raise error
            if error is not None:
                _exists(link, account, password, reset=True)
                messages += 1
        log.info("provisioned %d broker accounts in one control message", len(chunk))
    return messages


def _exists(link: BrokerLink, account: dynsec.AgentAccount, password: str, *, reset: bool) -> None:
    """The account already existed: reset it (password, roles, client id) or only correct its roles."""
    roles = account.role_names
    agent_id = account.username
    if reset:
        fresh = dynsec.modify_client(agent_id, password=password, roles=roles, client_id=account.client_id)
        dynsec.check(control(link, [fresh]))
        log.info("reset broker account %s (roles %s)", agent_id, roles)
    else:
        _set_roles_if_different(link, agent_id, roles)


def _set_roles_if_different(link: BrokerLink, agent_id: str, roles: list[str]) -> None:
    (response,) = dynsec.check(control(link, [dynsec.get_client(agent_id)]))
    if sorted(dynsec.client_roles(response)) != sorted(roles):
        dynsec.check(control(link, [dynsec.modify_client(agent_id, roles=roles)]))
        log.info("corrected the roles of broker account %s: %s", agent_id, roles)


def move_agent(
    link: BrokerLink, *, prefix: str, agent_id: str, old_group_id: str | int, new_group_id: str | int
) -> None:
    """Let the agent read the new group's config topics instead of the old group's.

    The role list is replaced in one `modifyClient`, so there is no moment with both groups or none;
    the broker disconnects the agent, and from then on delivers nothing of the old group to it, even
    on a subscription its persistent session still holds. The old group's role stays: other agents
    hold it, and deleting a role disconnects all of them.
    """
    ensure_group_role(link, prefix, new_group_id)
    roles = dynsec.agent_account(prefix, agent_id, new_group_id).role_names
    dynsec.check(control(link, [dynsec.modify_client(agent_id, roles=roles)]))
    log.info("moved broker account %s from group %s to %s", agent_id, old_group_id, new_group_id)


def remove_agent(link: BrokerLink, *, prefix: str, agent_id: str) -> None:
    """Delete the agent's account and role (it is disconnected at once) and clear its retained state."""
    responses = control(
        link, [dynsec.delete_client(agent_id), dynsec.delete_role(dynsec.agent_role_name(agent_id))]
    )
    _tolerate(responses, missing=True)
    # An empty retained payload deletes the retained message: the bridge would otherwise re-read the
    # removed agent's last state at every (re)subscription.
    link.publish(state_topic(prefix, agent_id), b"", retain=True)
    log.info("removed broker account %s", agent_id)
