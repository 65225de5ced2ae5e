"""FastAPI dependencies: the gateway object and the authenticated caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.ledger import Caller
from gateway.service import Gateway

bearer = HTTPBearer(
    auto_error=False,
    description="A client's token from registration, or the operator token",
)


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def get_caller(
    request: Request, creds: HTTPAuthorizationCredentials | None = Security(bearer)
) -> Caller:
    return get_gateway(request).ledger.authenticate(creds.credentials if creds else None)


def caller_address(request: Request) -> str:
    """Who registration limits count a request against: the peer's address. Behind a
    reverse proxy run uvicorn with ``--forwarded-allow-ips`` set to the proxy, so that this
    is the address the proxy saw (its X-Forwarded-For), never a header anyone can send."""
    return request.client.host if request.client is not None else "unknown"


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
CallerDep = Annotated[Caller, Depends(get_caller)]

BLOB_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
BLOB_RESPONSE: dict[int | str, dict[str, object]] = {
    200: {
        "description": "A codec blob (zstd-compressed tensors), as on the bus",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    304: {"description": "Not modified (If-None-Match matched the ETag)"},
}
