"""The gateway's actions, shared by the paper's routes and ``/api/v1``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from gateway.bridge import Bridge
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.ledger import Caller, ClientRef, Ledger, Model
from gateway.schemas import RegisterRequest, Registration, RoundInfo, Sent
from gateway.uploads import check_update, read_upload
from protocol.limits import TokenBuckets, device_info_refusal, retry_after_header
from protocol.messages import CommandAction

BLOB_MEDIA_TYPE = "application/octet-stream"


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


class Gateway:
    def __init__(self, config: GatewayConfig, ledger: Ledger, bridge: Bridge) -> None:
        self.config, self.ledger, self.bridge = config, ledger, bridge
        self.buckets = TokenBuckets(config.register_rate_per_s, config.register_burst)

    # --- membership ---------------------------------------------------------------------------

    def register(
        self, body: RegisterRequest, run_id: str | None = None, *, source: str = "unknown"
    ) -> Registration:
        """Limits first (protocol/limits.py): the caller's rate and the size of its
        ``device_info`` are checked here, before anything reaches the bus; the run's cap
        (and the broker user's rate) by the orchestrator, whose refusal comes back as 429."""
        wait = self.buckets.take(source)
        if wait > 0:
            raise GatewayError(
                429,
                f"too many registrations from {source}; retry in {wait:.1f} s",
                {"Retry-After": retry_after_header(wait)},
            )
        info = dict(body.device_info)
        too_big = device_info_refusal(info, self.config.max_device_info_bytes)
        if too_big is not None:
            raise GatewayError(422, too_big)
        run = self.ledger.run_id(run_id or body.run_id)
        cid, token, key = self.bridge.register(
            run, body.display_name, info, self.ledger.signing_key()
        )
        return Registration(run_id=run, client_id=cid, token=token, signing_key=key)

    def client(self, caller: Caller, client_id: str | None = None) -> ClientRef:
        """The calling client (or ``client_id``, which must be the caller)."""
        if client_id is not None:
            ref = self.ledger.client(caller, client_id)
            if caller.operator:
                raise GatewayError(403, "the operator token cannot act as a client")
            return ref
        if caller.client is None:
            raise GatewayError(403, "this route needs a client's token, not the operator's")
        return caller.client

    def remove(self, caller: Caller, client_id: str) -> Sent:
        """A client leaving (its own token) or kicked (the operator's token)."""
        ref = self.ledger.client(caller, client_id)
        if caller.operator:
            mid = self.bridge.command(
                ref.run_id, caller.token, CommandAction.KICK, target_client=ref.id
            )
        else:
            mid = self.bridge.leave(ref.run_id, ref.id, caller.token)
        return Sent(status="sent", message_id=mid)

    def signal(self, caller: Caller, state: str, client_id: str | None = None) -> Sent:
        ref = self.client(caller, client_id)
        return Sent(
            status="sent", message_id=self.bridge.signal(ref.run_id, ref.id, caller.token, state)
        )

    def stage(self, caller: Caller, client_id: str, body: dict[str, Any]) -> Sent:
        ref = self.client(caller, client_id)
        mid = self.bridge.stage(ref.run_id, ref.id, caller.token, body)
        return Sent(status="sent", message_id=mid)

    # --- operator -----------------------------------------------------------------------------

    def command(self, caller: Caller, run_id: str | None, action: CommandAction, **kw: Any) -> Sent:
        if not caller.operator:
            raise GatewayError(403, f"{action.value} needs the operator token")
        run = self.ledger.run_id(run_id)
        return Sent(status="sent", message_id=self.bridge.command(run, caller.token, action, **kw))

    # --- models and rounds --------------------------------------------------------------------

    def model_response(
        self, caller: Caller, run_id: str | None, version: int | None, if_none_match: str | None
    ) -> Response:
        run = self.ledger.run_id(run_id, caller)
        model: Model = self.ledger.model(run, version)
        headers = {
            "ETag": model.etag,
            "X-Fedmq-Model-Version": str(model.version),
            "X-Fedmq-Model-Sha256": model.sha256,
            "Cache-Control": "no-cache" if version is None else "max-age=31536000, immutable",
        }
        if etag_matches(if_none_match, model.etag):
            return Response(status_code=304, headers=headers)
        return Response(model.blob, media_type=BLOB_MEDIA_TYPE, headers=headers)

    def round_response(
        self, caller: Caller, run_id: str | None, if_none_match: str | None
    ) -> Response:
        info = self.ledger.round_info(self.ledger.run_id(run_id, caller))
        return _json_with_etag(info, if_none_match)

    async def next_round(self, caller: Caller, run_id: str, after: int, wait_s: float) -> Response:
        """The round info as soon as a round numbered above ``after`` exists; 204 after
        ``wait_s`` without one."""
        run = await run_in_threadpool(self.ledger.run_id, run_id, caller)
        end = time.monotonic() + min(wait_s, self.config.max_wait_s)
        while True:
            info = await run_in_threadpool(self.ledger.round_info, run)
            if info.round is not None and info.round > after:
                return _json_with_etag(info, None)
            if time.monotonic() >= end:
                return Response(status_code=204)
            await asyncio.sleep(self.config.poll_interval_s)

    def messages(self, caller: Caller, client_id: str, wait_s: float) -> dict[str, Any]:
        ref = self.client(caller, client_id)
        wait = min(wait_s, self.config.max_wait_s)
        messages, signed = self.bridge.messages(ref.run_id, ref.id, wait)
        return {"messages": messages, "signed": signed}

    # --- updates ------------------------------------------------------------------------------

    async def upload(
        self,
        request: Request,
        caller: Caller,
        client_id: str,
        *,
        round: int | None,
        base_model_version: int | None,
        num_samples: int,
        metrics: str | None,
        message_id: str | None,
    ) -> Sent:
        ref = await run_in_threadpool(self.client, caller, client_id)
        parsed = _metrics(metrics)
        # Refuse a closed round or an unexpected client before reading a large body.
        plan = await run_in_threadpool(self.ledger.expect_update, ref, round, base_model_version)
        blob = await read_upload(request, self.config.max_upload_bytes)
        if plan is None:
            return Sent(status="duplicate", round=round, bytes=len(blob))
        meta = await run_in_threadpool(
            check_update,
            blob,
            plan,
            self.config.decode_limits,
            token=caller.token,
            num_samples=num_samples,
            metrics=parsed,
            message_id=message_id,
        )
        await run_in_threadpool(self.bridge.publish_update, meta, blob)
        return Sent(status="sent", message_id=meta.message_id, round=meta.round, bytes=len(blob))


def _metrics(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise GatewayError(422, "metrics must be a JSON object") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and len(k) <= 64 and _scalar(v) for k, v in value.items()
    ):
        raise GatewayError(422, "metrics must be a flat JSON object of numbers and strings")
    return value


def _scalar(v: Any) -> bool:
    if isinstance(v, float):
        return v == v and abs(v) != float("inf")
    return v is None or isinstance(v, str | int | bool)


def _json_with_etag(info: RoundInfo, if_none_match: str | None) -> Response:
    body = info.model_dump_json().encode()
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    return Response(body, media_type="application/json", headers={"ETag": etag})
