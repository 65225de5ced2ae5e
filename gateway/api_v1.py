"""``/api/v1``: the paper's capabilities with runs and clients in the path, plus what a
device needs to poll efficiently: the current round and model with ETag / If-None-Match,
a long-poll for the next round, and the client's own message queue as a long-poll."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Request, Response

from gateway.deps import (
    BLOB_BODY,
    BLOB_RESPONSE,
    CallerDep,
    GatewayDep,
    caller_address,
)
from gateway.errors import ERROR_RESPONSES
from gateway.schemas import (
    AutorunRequest,
    Messages,
    RegisterRequest,
    Registration,
    RoundInfo,
    Sent,
    SignalRequest,
)
from protocol.messages import CommandAction

router = APIRouter(prefix="/api/v1", tags=["v1"], responses=ERROR_RESPONSES)

IDENT = r"^[A-Za-z0-9_-]{1,64}$"
RunPath = Annotated[str, Path(pattern=IDENT)]
ClientPath = Annotated[str, Path(pattern=IDENT)]
IfNoneMatch = Annotated[str | None, Header()]
Wait = Annotated[float, Query(ge=0, le=60, description="Seconds to wait (capped by the gateway)")]
ROUND_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"model": RoundInfo, "description": "The newest round of the run"},
    304: {"description": "Not modified (If-None-Match matched the ETag)"},
}


@router.post("/runs/{run_id}/clients", status_code=201, response_model=Registration)
def register(
    request: Request, gw: GatewayDep, run_id: RunPath, body: RegisterRequest
) -> Registration:
    """Register a client in the run (the body's run_id is ignored); 429 with Retry-After
    past the caller's rate or the run's cap."""
    return gw.register(body, run_id, source=caller_address(request))


@router.delete("/clients/{client_id}", status_code=202, response_model=Sent)
def remove_client(gw: GatewayDep, caller: CallerDep, client_id: ClientPath) -> Sent:
    """Leave (the client's token) or kick (the operator token)."""
    return gw.remove(caller, client_id)


@router.post("/clients/{client_id}/signal", status_code=202, response_model=Sent)
def signal(gw: GatewayDep, caller: CallerDep, client_id: ClientPath, body: SignalRequest) -> Sent:
    return gw.signal(caller, body.state, client_id)


@router.post("/clients/{client_id}/heartbeat", status_code=202, response_model=Sent)
def heartbeat(gw: GatewayDep, caller: CallerDep, client_id: ClientPath) -> Sent:
    return gw.signal(caller, "heartbeat", client_id)


@router.post("/clients/{client_id}/secagg", status_code=202, response_model=Sent)
def secagg_stage(
    gw: GatewayDep,
    caller: CallerDep,
    client_id: ClientPath,
    body: Annotated[dict[str, Any], Body(description="secagg_keys, _shares or _reveal")],
) -> Sent:
    """A SecAgg+ stage message of a secure round (the envelope as on the bus, without its
    ``mac``): sent on with a MAC under the caller's token."""
    return gw.stage(caller, client_id, body)


@router.get("/clients/{client_id}/messages", response_model=Messages)
def messages(gw: GatewayDep, caller: CallerDep, client_id: ClientPath, wait: Wait = 0.0) -> dict:
    """Long-poll the client's queue: round announcements and update notices, as JSON
    envelopes of the wire (the model itself comes from ``/runs/{run}/models/{version}``)."""
    return gw.messages(caller, client_id, wait)


@router.post(
    "/clients/{client_id}/updates", status_code=202, response_model=Sent, openapi_extra=BLOB_BODY
)
async def upload(
    request: Request,
    gw: GatewayDep,
    caller: CallerDep,
    client_id: ClientPath,
    num_samples: Annotated[int, Query(ge=1, le=10**12)],
    round: Annotated[
        int | None, Query(ge=0, le=10**9, description="Default: the open round")
    ] = None,
    base_model_version: Annotated[int | None, Query(ge=0, le=10**9)] = None,
    metrics: Annotated[str | None, Query(max_length=4096, description="JSON object")] = None,
    message_id: Annotated[str | None, Query(pattern=IDENT)] = None,
) -> Sent:
    """An update blob (as on the bus), streamed with a size cap and checked by the codec
    against the base version before it is acknowledged and put on the bus."""
    return await gw.upload(
        request,
        caller,
        client_id,
        round=round,
        base_model_version=base_model_version,
        num_samples=num_samples,
        metrics=metrics,
        message_id=message_id,
    )


@router.get("/runs/{run_id}/round", response_class=Response, responses=ROUND_RESPONSES)
def current_round(
    gw: GatewayDep, caller: CallerDep, run_id: RunPath, if_none_match: IfNoneMatch = None
) -> Response:
    """The newest round and global model version, with an ETag."""
    return gw.round_response(caller, run_id, if_none_match)


@router.get(
    "/runs/{run_id}/rounds/next",
    response_class=Response,
    responses={
        200: {"model": RoundInfo, "description": "A round numbered above `after`"},
        204: {"description": "No such round within the wait"},
    },
)
async def next_round(
    gw: GatewayDep,
    caller: CallerDep,
    run_id: RunPath,
    after: Annotated[int, Query(ge=0, le=10**9)] = 0,
    wait: Wait = 25.0,
) -> Response:
    """Long-poll: answers as soon as a round numbered above ``after`` exists."""
    return await gw.next_round(caller, run_id, after, wait)


@router.get("/runs/{run_id}/model", response_class=Response, responses=BLOB_RESPONSE)
def global_model(
    gw: GatewayDep, caller: CallerDep, run_id: RunPath, if_none_match: IfNoneMatch = None
) -> Response:
    """The newest global model blob; ETag = its SHA-256, so If-None-Match makes a poll free."""
    return gw.model_response(caller, run_id, None, if_none_match)


@router.get("/runs/{run_id}/models/{version}", response_class=Response, responses=BLOB_RESPONSE)
def model_version(
    gw: GatewayDep,
    caller: CallerDep,
    run_id: RunPath,
    version: Annotated[int, Path(ge=0, le=10**9)],
    if_none_match: IfNoneMatch = None,
) -> Response:
    """One global model version (immutable)."""
    return gw.model_response(caller, run_id, version, if_none_match)


@router.post("/runs/{run_id}/autorun", status_code=202, response_model=Sent)
def autorun(gw: GatewayDep, caller: CallerDep, run_id: RunPath, body: AutorunRequest) -> Sent:
    """Operator: run N rounds one after the other."""
    return gw.command(caller, run_id, CommandAction.AUTORUN, rounds=body.rounds)


@router.delete("/runs/{run_id}/autorun", status_code=202, response_model=Sent)
def stop_autorun(gw: GatewayDep, caller: CallerDep, run_id: RunPath) -> Sent:
    """Operator: stop autorun after the current round."""
    return gw.command(caller, run_id, CommandAction.STOP_AUTORUN)
