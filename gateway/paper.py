"""The second paper's REST API, same paths and methods (DESIGN.md, "The two papers").

The paper's routes name no run: a client's token says which run it is in; registration and
the operator's routes take ``run_id`` (query or body), else the gateway's default run.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response

from gateway.deps import (
    BLOB_BODY,
    BLOB_RESPONSE,
    CallerDep,
    GatewayDep,
    caller_address,
)
from gateway.errors import ERROR_RESPONSES
from gateway.schemas import RegisterRequest, Registration, Sent, SignalRequest
from protocol.messages import CommandAction

router = APIRouter(tags=["paper"], responses=ERROR_RESPONSES)

RunQuery = Annotated[
    str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Default: the gateway's run")
]
ClientPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


@router.post("/client", status_code=201, response_model=Registration)
def register(request: Request, gw: GatewayDep, body: RegisterRequest) -> Registration:
    """Register a client: returns its de-identified id and bearer token (429 with
    Retry-After past the caller's rate or the run's cap)."""
    return gw.register(body, source=caller_address(request))


@router.get("/client", response_class=Response, responses=BLOB_RESPONSE)
def initial_parameters(
    gw: GatewayDep, caller: CallerDep, if_none_match: Annotated[str | None, Header()] = None
) -> Response:
    """The run's initial parameters (model version 0), compressed."""
    return gw.model_response(caller, None, 0, if_none_match)


@router.post("/client/autorun/{rounds}", status_code=202, response_model=Sent)
def autorun(
    gw: GatewayDep,
    caller: CallerDep,
    rounds: Annotated[int, Path(ge=1, le=100_000)],
    run_id: RunQuery = None,
) -> Sent:
    """Operator: run ROUNDS rounds one after the other."""
    return gw.command(caller, run_id, CommandAction.AUTORUN, rounds=rounds)


@router.delete("/client/autorun", status_code=202, response_model=Sent)
def stop_autorun(gw: GatewayDep, caller: CallerDep, run_id: RunQuery = None) -> Sent:
    """Operator: stop autorun after the current round."""
    return gw.command(caller, run_id, CommandAction.STOP_AUTORUN)


@router.delete("/client/{client_id}", status_code=202, response_model=Sent)
def remove_client(gw: GatewayDep, caller: CallerDep, client_id: ClientPath) -> Sent:
    """A client leaves (its own token), or the operator kicks it (the operator token)."""
    return gw.remove(caller, client_id)


@router.post("/client/signal", status_code=202, response_model=Sent)
def signal(gw: GatewayDep, caller: CallerDep, body: SignalRequest) -> Sent:
    """The calling client's state (join, ready, training, update, finish, offline) or a
    heartbeat."""
    return gw.signal(caller, body.state)


@router.get("/transmitter", response_class=Response, responses=BLOB_RESPONSE)
def global_parameters(
    gw: GatewayDep, caller: CallerDep, if_none_match: Annotated[str | None, Header()] = None
) -> Response:
    """The current global parameters, compressed (ETag: the blob's SHA-256)."""
    return gw.model_response(caller, None, None, if_none_match)


@router.post("/transmitter/{name}", status_code=202, response_model=Sent, openapi_extra=BLOB_BODY)
async def local_parameters(
    request: Request,
    gw: GatewayDep,
    caller: CallerDep,
    name: Annotated[
        str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The uploading client's id")
    ],
    num_samples: Annotated[int, Query(ge=1, le=10**12)],
    round: Annotated[
        int | None, Query(ge=0, le=10**9, description="Default: the open round")
    ] = None,
    base_model_version: Annotated[int | None, Query(ge=0, le=10**9)] = None,
    metrics: Annotated[str | None, Query(max_length=4096, description="JSON object")] = None,
    message_id: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = None,
) -> Sent:
    """Local parameters: the body is a codec blob (a delta against the round's global model,
    or full values), checked before it is put on the bus as the update's chunks."""
    return await gw.upload(
        request,
        caller,
        name,
        round=round,
        base_model_version=base_model_version,
        num_samples=num_samples,
        metrics=metrics,
        message_id=message_id,
    )
