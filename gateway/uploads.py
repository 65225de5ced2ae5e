"""Update uploads: streamed in with a size cap, then checked by the codec exactly as the
orchestrator's ingest will check them, before the gateway acknowledges anything."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from fastapi import Request

from gateway.errors import GatewayError
from gateway.ledger import UploadPlan
from protocol import auth
from protocol.codec import CodecError, DecodeLimits, decode
from protocol.http_body import BodyRefused, read_limited
from protocol.messages import UpdateMeta


async def read_upload(request: Request, limit: int) -> bytes:
    """The request body, refused (413) before it passes ``limit`` bytes, (400) when its
    Content-Length is not a byte count, and (422) when it is empty."""
    try:
        body = await read_limited(request.headers.get("content-length"), request.stream(), limit)
    except BodyRefused as e:
        raise GatewayError(e.status, f"upload refused: {e.reason}") from None
    if not body:
        raise GatewayError(422, "empty upload: the body must be a codec blob")
    return bytes(body)


def check_update(
    blob: bytes,
    plan: UploadPlan,
    limits: DecodeLimits,
    *,
    token: str,
    num_samples: int,
    metrics: dict[str, Any],
    message_id: str | None,
) -> UpdateMeta:
    """The ``UpdateMeta`` an AMQP device would send with this blob, once the blob decodes
    within ``limits`` against the base version's names, shapes and dtypes (no NaN/Inf)."""
    try:
        decoded = decode(blob, limits=limits, expected=plan.spec)
    except CodecError as e:
        raise GatewayError(422, f"bad update blob: {e}") from None
    for name, arr in decoded.tensors.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise GatewayError(422, f"bad update blob: {name} holds NaN or Inf")
    if decoded.delta and decoded.base_version != str(plan.base_version):
        raise GatewayError(
            422,
            f"the blob is a delta against version {decoded.base_version}, "
            f"not base_model_version {plan.base_version}",
        )
    fields: dict[str, Any] = {
        "run_id": plan.run_id,
        "client_id": plan.client_id,
        "round": plan.round,
        "base_model_version": plan.base_version,
        "num_samples": num_samples,
        "encoding": decoded.encoding.value,
        "is_delta": decoded.delta,
        "blob_sha256": hashlib.sha256(blob).hexdigest(),
        "blob_bytes": len(blob),
        "metrics": metrics,
    }
    if message_id is not None:
        fields["message_id"] = message_id  # the device's own id: its notices name it
    try:
        meta = UpdateMeta(**fields)
    except ValueError as e:
        raise GatewayError(422, f"invalid update: {e}") from None
    # The device's bearer token stays on its HTTP link; the bus gets a MAC under it.
    return auth.sign(meta, token)
