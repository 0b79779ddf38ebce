"""Mosquitto dynamic-security: the commands Policycast sends, the roles it gives agents, and errors.

Pure functions: each returns one command dict for `control.control`, which sends a list of them in one
`$CONTROL/dynamic-security/v1` message. `check` turns a response carrying an `error` into `DynsecError`.

Roles (the only authorisation agents get; the broker denies everything else by default):

- `pc-group-{group_id}`: read every config topic of one group, `{prefix}/v1/config/{group_id}/#`. Shared
  by the agents of the group; an agent switching location needs no change.
- `pc-agent-{agent_id}`: read its own cmd topic, write its own state topic. One role per agent because
  Mosquitto 2.0.11 does not substitute `%u`/`%c` in dynamic-security ACL topics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker_bridge.errors import DynsecError
from fabric_core.topics import check_id, cmd_topic, group_config_filter, state_topic

Command = dict[str, Any]

GROUP_ROLE_PREFIX = "pc-group-"
AGENT_ROLE_PREFIX = "pc-agent-"


def check(responses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The responses, or `DynsecError` for the first that carries an error."""
    for response in responses:
        error = response.get("error")
        if error:
            raise DynsecError(str(response.get("command")), str(error))
    return responses


def error_of(response: dict[str, Any]) -> DynsecError | None:
    """The error a single response carries, if any (to tolerate some, e.g. `already_exists`)."""
    error = response.get("error")
    return DynsecError(str(response.get("command")), str(error)) if error else None


# --- ACLs and roles --------------------------------------------------------------------------------------


def acl(acltype: str, topic: str, *, allow: bool = True, priority: int = 0) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": allow, "priority": priority}


def group_role_name(group_id: str | int) -> str:
    return GROUP_ROLE_PREFIX + check_id(group_id, "group id")


def agent_role_name(agent_id: str) -> str:
    return AGENT_ROLE_PREFIX + check_id(agent_id, "agent id")


def group_acls(prefix: str, group_id: str | int) -> list[dict[str, Any]]:
    # Subscribing and receiving are two checks: subscribePattern lets the SUBSCRIBE through, and
    # publishClientReceive lets each message out to the agent (the default denies it).
    topics = group_config_filter(prefix, group_id)
    return [acl("subscribePattern", topics), acl("publishClientReceive", topics)]


def agent_acls(prefix: str, agent_id: str) -> list[dict[str, Any]]:
    cmd = cmd_topic(prefix, agent_id)
    return [
        acl("subscribePattern", cmd),
        acl("publishClientReceive", cmd),
        acl("publishClientSend", state_topic(prefix, agent_id)),
    ]


@dataclass(frozen=True, slots=True)
class Role:
    """A dynamic-security role: its name and ACLs."""

    name: str
    acls: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class AgentAccount:
    """What one agent's broker account is, the one definition both provisioning paths build from: the
    control API (`accounts.provision_agent`, commands) and the bulk file write (`bulk`, JSON entries).

    Username and bound client id are the agent id; its roles are its own and its group's."""

    username: str
    client_id: str
    own_role: Role
    group_role: Role

    @property
    def roles(self) -> tuple[Role, Role]:
        return (self.own_role, self.group_role)

    @property
    def role_names(self) -> list[str]:
        return [role.name for role in self.roles]


def group_role_def(prefix: str, group_id: str | int) -> Role:
    """The role that reads one group's config topics."""
    return Role(group_role_name(group_id), group_acls(prefix, group_id))


def agent_account(prefix: str, agent_id: str, group_id: str | int) -> AgentAccount:
    return AgentAccount(
        username=agent_id,
        client_id=agent_id,
        own_role=Role(agent_role_name(agent_id), agent_acls(prefix, agent_id)),
        group_role=group_role_def(prefix, group_id),
    )


def create_account(account: AgentAccount, password: str, *, group_role: bool = True) -> list[Command]:
    """The commands that make `account` from nothing: its roles (`group_role=False`: not its group's,
    made once for a batch of agents), then the client bound to its client id."""
    roles = account.roles if group_role else (account.own_role,)
    return [
        *(create_role(role.name, role.acls) for role in roles),
        create_client(account.username, password, account.role_names, client_id=account.client_id),
    ]


def group_role(prefix: str, group_id: str | int) -> Command:
    """`createRole` for the role that reads one group's config topics."""
    role = group_role_def(prefix, group_id)
    return create_role(role.name, role.acls)


# --- commands --------------------------------------------------------------------------------------------


def _roles(names: list[str]) -> list[dict[str, Any]]:
    return [{"rolename": name} for name in names]


def create_role(name: str, acls: list[dict[str, Any]]) -> Command:
    return {"command": "createRole", "rolename": name, "acls": acls}


def delete_role(name: str) -> Command:
    return {"command": "deleteRole", "rolename": name}


def get_role(name: str) -> Command:
    return {"command": "getRole", "rolename": name}


def add_role_acl(name: str, entry: dict[str, Any]) -> Command:
    return {"command": "addRoleACL", "rolename": name, **entry}


def create_client(username: str, password: str, roles: list[str], *, client_id: str | None = None) -> Command:
    """`createClient`; `client_id` binds the account to that MQTT client id (no other id may connect
    with it: a stolen password cannot take another client's session over)."""
    command: Command = {"command": "createClient", "username": username, "password": password}
    command["roles"] = _roles(roles)
    if client_id is not None:
        command["clientid"] = client_id
    return command


def delete_client(username: str) -> Command:
    return {"command": "deleteClient", "username": username}


def get_client(username: str) -> Command:
    return {"command": "getClient", "username": username}


def modify_client(
    username: str,
    *,
    password: str | None = None,
    roles: list[str] | None = None,
    client_id: str | None = None,
) -> Command:
    """`modifyClient`: set the password, the bound client id and/or the whole role list in one
    command."""
    command: Command = {"command": "modifyClient", "username": username}
    if password is not None:
        command["password"] = password
    if client_id is not None:
        command["clientid"] = client_id
    if roles is not None:
        command["roles"] = _roles(roles)
    return command


def set_client_password(username: str, password: str) -> Command:
    return {"command": "setClientPassword", "username": username, "password": password}


def add_client_role(username: str, role: str, priority: int = 0) -> Command:
    return {"command": "addClientRole", "username": username, "rolename": role, "priority": priority}


def remove_client_role(username: str, role: str) -> Command:
    return {"command": "removeClientRole", "username": username, "rolename": role}


def enable_client(username: str) -> Command:
    return {"command": "enableClient", "username": username}


def disable_client(username: str) -> Command:
    return {"command": "disableClient", "username": username}


def list_clients(*, count: int = -1, offset: int = 0) -> Command:
    return {"command": "listClients", "verbose": False, "count": count, "offset": offset}


def client_roles(response: dict[str, Any]) -> list[str]:
    """The role names in a `getClient` response."""
    client = response.get("data", {}).get("client", {})
    return [str(role["rolename"]) for role in client.get("roles", []) if "rolename" in role]
