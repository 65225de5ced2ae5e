"""Every failure answers JSON ``{"status": ..., "reason": ...}``; bad input is never a 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    status: int
    reason: str


class GatewayError(Exception):
    """An answer other than success: an HTTP status and a reason a person can act on (and
    headers, e.g. ``Retry-After`` on a 429)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        ErrorBody(status=status, reason=reason).model_dump(), status_code=status, headers=headers
    )


# Documented on every route, so the OpenAPI schema says what an error looks like.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody, "description": why}
    for code, why in {
        400: "Bad request",
        401: "Missing or unknown bearer token",
        403: "The token may not do this",
        404: "Unknown run, client, round or model version",
        409: "Conflicts with the round's state (closed round, not selected, ...)",
        413: "Upload larger than the gateway accepts",
        422: "Invalid parameters or blob",
        429: "Too many registrations from this address, or the run is full (see Retry-After)",
        503: "The message bus is unavailable",
        504: "The orchestrator did not answer in time",
    }.items()
}


def install(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc.status, exc.reason, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")
