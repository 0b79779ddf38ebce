"""Broker accounts follow the agents table: one account per active agent, reading only its group.

The api never talks to the broker: it records agents (enrolled, moved, revoked) and hands out a password
derived from the signing key. Each round the lease-holding bridge finds the agents whose broker account
is not what the table says (`acl_group_id` differs from `group_id`, or a revoked agent still has one),
fixes the account, and records what the broker now allows. Idempotent, so a crash mid-round is harmless.
"""

from __future__ import annotations

import logging

from sqlalchemy import ColumnElement, Engine, and_, or_, update
from sqlmodel import Session, col, select

from manager_db.models import Agent
from broker_bridge.broker import BrokerLink
from broker_bridge.credentials import agent_password
from broker_bridge.provisioning import move_agent, provision_agent, remove_agent
from fabric_core.signing import SigningKey

log = logging.getLogger(__name__)


def reconcile_accounts(
    engine: Engine, link: BrokerLink, *, prefix: str, signing_key: SigningKey, batch: int = 200
) -> int:
    """Bring up to `batch` broker accounts in line with the agents table; return how many changed."""
    with Session(engine) as session:
        drifted = session.exec(
            select(Agent)
            .where(
                or_(
                    and_(
                        col(Agent.revoked_at).is_(None),
                        or_(
                            col(Agent.acl_group_id).is_(None), col(Agent.acl_group_id) != col(Agent.group_id)
                        ),
                    ),
                    and_(col(Agent.revoked_at).is_not(None), col(Agent.acl_group_id).is_not(None)),
                )
            )
            .limit(batch)
        ).all()
    for agent in drifted:
        target = None if agent.revoked_at is not None else agent.group_id
        _fix(link, agent, prefix=prefix, signing_key=signing_key)
        _record(engine, agent.id, was=agent.acl_group_id, now=target)
    return len(drifted)


def _fix(link: BrokerLink, agent: Agent, *, prefix: str, signing_key: SigningKey) -> None:
    if agent.revoked_at is not None:
        remove_agent(link, prefix=prefix, agent_id=agent.id)
        log.info("removed the broker account of revoked agent %s", agent.id)
    elif agent.acl_group_id is None:
        password = agent_password(signing_key, agent.id)
        provision_agent(link, prefix=prefix, agent_id=agent.id, group_id=agent.group_id, password=password)
        log.info("provisioned a broker account for agent %s (group %d)", agent.id, agent.group_id)
    else:
        move_agent(
            link,
            prefix=prefix,
            agent_id=agent.id,
            old_group_id=agent.acl_group_id,
            new_group_id=agent.group_id,
        )
        log.info("moved agent %s's broker account to group %d", agent.id, agent.group_id)


def _record(engine: Engine, agent_id: str, *, was: int | None, now: int | None) -> None:
    with Session(engine) as session:
        session.execute(update(Agent).where(col(Agent.id) == agent_id, _same(was)).values(acl_group_id=now))
        session.commit()


def _same(value: int | None) -> ColumnElement[bool]:
    """`acl_group_id` still is what this round read (so a concurrent change is not overwritten)."""
    column = col(Agent.acl_group_id)
    return column.is_(None) if value is None else column == value
