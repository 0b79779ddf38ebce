"""/agent/v1/enroll: an enrolment token for an agent id, a secret, the signing key and broker access."""

from __future__ import annotations

from fastapi import APIRouter
from sqlmodel import Session

from api.deps import FabricDep
from api.errors import Invalid
from api.openapi import errors
from api.services import agents
from api.services.change import Change
from fabric_core.canonical import PLAIN_JSON, is_plain_json
from fabric_core.wire import EnrollRequest, EnrollResponse, SigningKeyInfo

router = APIRouter(prefix="/agent/v1", tags=["agent"])


@router.post("/enroll", response_model=EnrollResponse, responses=errors(401))
def enroll(body: EnrollRequest, fabric: FabricDep) -> EnrollResponse:
    """Exchange an enrolment token for an agent id, a secret and the key that signs documents."""
    if not is_plain_json(body.facts):
        raise Invalid(f"facts must be {PLAIN_JSON}")
    with Session(fabric.engine, expire_on_commit=False) as session:
        change = Change(session=session, actor="enrollment", signing_key=fabric.signing_key)
        enrolment = agents.enroll(
            change,
            token=body.token,
            hostname=body.hostname,
            facts=body.facts,
            access_granted=fabric.broker is not None and fabric.broker.access_in_credentials,
        )
        change.commit()
    fabric.metrics.enrolments.inc()
    verify_key = fabric.signing_key.verify_key
    # The broker engine answers for the broker's side: with Mosquitto the account appears within a
    # bridge round (it provisions from the agents table); until then the agent's connects are refused
    # and it keeps converging by heartbeat. A NATS JWT is the access itself, granted at enrolment.
    mqtt = (
        None
        if fabric.broker is None
        else fabric.broker.enrolment_credentials(enrolment.agent.id, enrolment.agent.group_id)
    )
    return EnrollResponse(
        agent_id=enrolment.agent.id,
        secret=enrolment.secret,
        group_id=enrolment.agent.group_id,
        signing_key=SigningKeyInfo(kid=verify_key.kid, public_key=verify_key.public_base64),
        mqtt=mqtt,
    )
