"""``HttpTransport``: a device that speaks only HTTP, through the REST gateway's ``/api/v1``.

The gateway turns each call into the bus message an AMQP device sends, and keeps the
client's ``device.<client_id>`` queue, which ``receive`` long-polls. What comes back is
handed to ``FederatedClient`` in the shapes the bus would have delivered: JSON envelopes
as they are, and the round's global model (fetched whole, by version, when an
announcement names one not fetched yet) as the one-chunk blob with its ``ModelMeta``.
A gateway's refusal of an update (closed round, bad blob) becomes the ``update.rejected``
notice the orchestrator would have sent.

Messages from the queue come as the exact bytes the orchestrator signed with their
signature (the answer's ``signed`` list), so the client verifies them as an AMQP device
does. What this transport makes itself from the gateway's own answers (the fetched model,
a refusal notice) is marked ``local``: it is as trustworthy as the HTTPS link to the
gateway, and the model must still match the SHA-256 of a signed announcement.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx

from devices.transport import Inbound, LinkError, Transport, TrustError
from devices.wire import Identity
from protocol import chunking, enveloped
from protocol.bus import BusConfig, BusError
from protocol.codec import CodecError, Encoding, peek_header
from protocol.messages import ClientState, Envelope, Event, ModelMeta, UpdateMeta
from protocol.signing import BROADCAST, SIGNATURE_HEADER, SignatureError, Verifier

log = logging.getLogger(__name__)


class HttpInbound:
    """A message the gateway already took off the queue: settling it is a no-op.
    ``local``: made by the transport from a gateway answer, not relayed from the queue."""

    def __init__(
        self, body: bytes, headers: dict[str, Any] | None = None, *, local: bool = False
    ) -> None:
        self.body, self.headers, self.local = body, dict(headers or {}), local

    def ack(self) -> None:
        pass

    def reject(self, reason: str) -> None:
        log.warning("dropped a message from the gateway: %s", reason)


class HttpTransport(Transport):
    def __init__(
        self,
        gateway_url: str,
        *,
        bus: BusConfig | None = None,
        wait_s: float = 1.0,
        timeout_s: float = 60.0,
        client: httpx.Client | None = None,
    ) -> None:
        self.base = gateway_url.rstrip("/")
        self.config = bus or BusConfig()
        self.wait_s = wait_s
        self.http = client or httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0))
        self._inbox: deque[Inbound] = deque()
        self._fetched: set[tuple[str, int]] = set()
        # Whose bearer token an update goes with: an ``UpdateMeta`` carries a MAC, not it.
        self._idents: dict[str, Identity] = {}
        self._closed = False

    # --- plumbing -----------------------------------------------------------------------------

    def _call(
        self, method: str, path: str, ident: Identity | None = None, **kw: Any
    ) -> httpx.Response:
        if self._closed:
            raise LinkError("the HTTP transport is closed")
        headers = dict(kw.pop("headers", {}))
        if ident is not None:
            headers["Authorization"] = f"Bearer {ident.token}"
            self._idents[ident.client_id] = ident
        try:
            res = self.http.request(method, self.base + path, headers=headers, **kw)
        except httpx.HTTPError as e:
            raise LinkError(f"gateway unreachable: {type(e).__name__}: {e}") from None
        if res.status_code >= 500:
            raise LinkError(f"gateway answered {res.status_code}: {_reason(res)}")
        return res

    # --- the Transport ------------------------------------------------------------------------

    def register(
        self,
        run_id: str,
        display_name: str,
        *,
        device_info: dict[str, Any],
        timeout_s: float,
        poll_s: float,
        stopping: Callable[[], bool],
        expected_key: str | None = None,
    ) -> Identity | None:
        if stopping():
            return None
        res = self._call(
            "POST",
            f"/api/v1/runs/{run_id}/clients",
            json={"display_name": display_name, "device_info": device_info},
            timeout=timeout_s,
        )
        if res.status_code != 201:
            raise LinkError(f"registration refused ({res.status_code}): {_reason(res)}")
        body = res.json()
        key = body.get("signing_key")
        if not isinstance(key, str):
            raise LinkError("the gateway's registration answer names no orchestrator key")
        if expected_key is not None and key != expected_key:
            # This answer came over our own connection to the gateway: the orchestrator
            # behind it has another key. Not a forgery to wait out; not to be trusted.
            raise TrustError(
                f"the gateway names orchestrator key {key}, not the pinned {expected_key}"
            )
        try:
            Verifier(key)
        except (SignatureError, ValueError) as e:
            raise LinkError(f"the gateway's orchestrator key is unusable: {e}") from None
        ident = Identity(run_id, body["client_id"], body["token"], signing_key=key)
        self._idents[ident.client_id] = ident
        return ident

    def attach(self, ident: Identity) -> None:
        """Nothing on the wire: the gateway re-declares the queue on ``join`` and ``ready``."""
        self._idents[ident.client_id] = ident

    def signal(self, ident: Identity, state: ClientState) -> None:
        path = f"/api/v1/clients/{ident.client_id}/signal"
        self._expect(self._call("POST", path, ident, json={"state": state.value}), "signal")

    def heartbeat(self, ident: Identity) -> None:
        path = f"/api/v1/clients/{ident.client_id}/heartbeat"
        self._expect(self._call("POST", path, ident), "heartbeat")

    def send_stage(self, ident: Identity, msg: Envelope) -> None:
        """The stage message without a MAC: the gateway adds it (the token is on this link)."""
        body = json.loads(msg.to_json())
        path = f"/api/v1/clients/{ident.client_id}/secagg"
        self._expect(self._call("POST", path, ident, json=body), "secagg")

    def send_update(self, meta: UpdateMeta, blob: bytes, chunk_size: int) -> None:
        params: dict[str, Any] = {
            "round": meta.round,
            "base_model_version": meta.base_model_version,
            "num_samples": meta.num_samples,
            "message_id": meta.message_id,
            "metrics": json.dumps(meta.metrics),
        }
        res = self._call(
            "POST",
            f"/api/v1/clients/{meta.client_id}/updates",
            self._ident(meta),
            params=params,
            content=blob,
            headers={"Content-Type": "application/octet-stream"},
        )
        if res.status_code >= 400:  # refused by the gateway: what the orchestrator would say
            notice = Event(
                run_id=meta.run_id,
                client_id=meta.client_id,
                round=meta.round,
                kind="update.rejected",
                correlation_id=meta.message_id,
                detail={"reason": _reason(res)},
            )
            self._inbox.append(HttpInbound(notice.to_json(), local=True))

    def _ident(self, meta: UpdateMeta) -> Identity:
        ident = self._idents.get(meta.client_id)
        if ident is None or ident.run_id != meta.run_id:
            raise LinkError(f"no registration of {meta.client_id} in run {meta.run_id} here")
        return ident

    def receive(self, ident: Identity, timeout: float) -> Inbound | None:
        if not self._inbox:
            self._poll(ident)
        return self._inbox.popleft() if self._inbox else None

    def leave(self, ident: Identity) -> None:
        self._expect(self._call("DELETE", f"/api/v1/clients/{ident.client_id}", ident), "leave")

    def backoff(self, attempt: int) -> float:
        return self.config.backoff(attempt)

    def fatal(self, error: BusError) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self.http.close()

    # --- receiving ----------------------------------------------------------------------------

    def _poll(self, ident: Identity) -> None:
        began = time.monotonic()
        res = self._call(
            "GET",
            f"/api/v1/clients/{ident.client_id}/messages",
            ident,
            params={"wait": self.wait_s},
        )
        if res.status_code != 200:
            self._expect(res, "messages")
            time.sleep(max(0.0, self.wait_s - (time.monotonic() - began)))
            return
        answer = res.json()
        signed = answer.get("signed")
        if not isinstance(signed, list):  # a gateway of an older release: nothing signed
            signed = [{"body": json.dumps(m)} for m in answer.get("messages", [])]
        for item in signed:
            if not isinstance(item, dict) or not isinstance(item.get("body"), str):
                continue
            body = item["body"].encode()
            sig = item.get("signature")
            inbound = HttpInbound(body, {SIGNATURE_HEADER: sig} if isinstance(sig, str) else {})
            version = self._announced_version(ident, inbound)
            if version is not None:
                self._fetch_model(ident, version)
            self._inbox.append(inbound)  # the client verifies it (again) before acting

    @staticmethod
    def _announced_version(ident: Identity, inbound: HttpInbound) -> int | None:
        """The model version a signed round announcement names; None for anything else,
        so a forged announcement costs no download."""
        try:
            msg = json.loads(inbound.body)
        except ValueError:
            return None
        if not isinstance(msg, dict) or msg.get("type") != "round":
            return None
        version = msg.get("model_version")
        if not isinstance(version, int) or ident.signing_key is None:
            return None
        try:
            Verifier(ident.signing_key).verify(
                "round", ident.run_id, BROADCAST, inbound.body, inbound.headers
            )
        except SignatureError:
            return None
        return version

    def _fetch_model(self, ident: Identity, version: int) -> None:
        if (ident.run_id, version) in self._fetched:
            return
        res = self._call("GET", f"/api/v1/runs/{ident.run_id}/models/{version}", ident)
        if res.status_code != 200:
            log.warning("model %s: %s", version, _reason(res))
            return  # the client skips the round when the model never arrives
        blob = res.content
        meta = ModelMeta(
            run_id=ident.run_id,
            model_version=version,
            blob_sha256=res.headers.get("x-fedmq-model-sha256", ""),
            blob_bytes=len(blob),
            encoding=_encoding(blob),
        )
        chunk = next(
            chunking.iter_chunks(blob, max(1, len(blob)), f"model-{ident.run_id}-{version}")
        )
        headers = enveloped.headers(chunk, meta)
        self._inbox.append(HttpInbound(blob, headers, local=True))
        self._fetched.add((ident.run_id, version))

    @staticmethod
    def _expect(res: httpx.Response, what: str) -> None:
        """A refused call is logged, not retried: the AMQP path would have dead-lettered it."""
        if res.status_code >= 400:
            log.warning("%s refused (%s): %s", what, res.status_code, _reason(res))


def _encoding(blob: bytes) -> Encoding:
    try:
        return peek_header(blob).encoding
    except CodecError:
        return Encoding.FP32  # the model store's decode refuses the blob with the reason


def _reason(res: httpx.Response) -> str:
    try:
        body = res.json()
    except ValueError:
        return res.text[:200]
    return str(body.get("reason", body)) if isinstance(body, dict) else str(body)[:200]
