"""``HttpTransport`` on a scripted gateway (httpx.MockTransport): what it hands to the
FederatedClient is what the bus would have delivered."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import httpx
import numpy as np
import pytest

from devices.http import HttpTransport
from devices.store import ModelStore
from devices.transport import LinkError, TrustError
from devices.wire import Identity
from protocol import chunking
from protocol.codec import Encoding, encode, spec_of
from protocol.messages import (
    ClientState,
    Event,
    RoundAnnouncement,
    UpdateMeta,
    parse_message,
    utcnow,
)
from protocol.signing import BROADCAST, SIGNATURE_HEADER, Signer, Verifier, generate_key

SIGNER = Signer(generate_key()[0])
FORGER = Signer(generate_key()[0])
IDENT = Identity("run-1", "c-1", "t" * 32, signing_key=SIGNER.public_key)
WEIGHTS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
BLOB = encode(WEIGHTS, Encoding.FP32)
SHA = hashlib.sha256(BLOB).hexdigest()


def _announcement() -> RoundAnnouncement:
    return RoundAnnouncement(
        run_id="run-1",
        round=1,
        model_version=0,
        model_sha256=SHA,
        model_bytes=len(BLOB),
        deadline=utcnow() + timedelta(minutes=1),
        selected=["c-1"],
    )


def _signed(ann: RoundAnnouncement, signer: Signer = SIGNER) -> dict[str, str | None]:
    body = ann.to_json()
    return {"body": body.decode(), "signature": signer.sign("round", "run-1", BROADCAST, body)}


class Gateway:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.queue: list[dict[str, str | None]] = []
        self.upload_status = 202
        self.signing_key = SIGNER.public_key

    def __call__(self, req: httpx.Request) -> httpx.Response:
        self.calls.append((req.method, req.url.path))
        if req.url.path.endswith("/clients"):
            return httpx.Response(
                201, json={"client_id": "c-1", "token": "t" * 32, "signing_key": self.signing_key}
            )
        assert req.headers.get("authorization") == f"Bearer {IDENT.token}"
        if req.url.path.endswith("/messages"):
            signed, self.queue = self.queue, []
            msgs = [json.loads(m["body"] or "") for m in signed]
            return httpx.Response(200, json={"messages": msgs, "signed": signed})
        if req.url.path == "/api/v1/runs/run-1/models/0":
            return httpx.Response(200, content=BLOB, headers={"X-Fedmq-Model-Sha256": SHA})
        if req.url.path.endswith("/updates"):
            reason = {"status": self.upload_status, "reason": "round 1 is not open"}
            return httpx.Response(self.upload_status, json=reason)
        if req.url.path.endswith("/signal"):
            return httpx.Response(503, json={"status": 503, "reason": "bus down"})
        return httpx.Response(404, json={"status": 404, "reason": "no route"})


def _transport(gw: Gateway) -> HttpTransport:
    client = httpx.Client(transport=httpx.MockTransport(gw))
    return HttpTransport("http://gw", client=client, wait_s=0.0)


def test_an_announcement_brings_its_model_first_as_a_one_chunk_blob_fetched_once() -> None:
    gw = Gateway()
    t = _transport(gw)
    gw.queue = [_signed(_announcement()), _signed(_announcement())]
    model = t.receive(IDENT, 0.1)
    assert model is not None and chunking.is_chunk(model.headers)
    assert getattr(model, "local", False)  # made from the gateway's answer, not relayed
    store = ModelStore(expected=spec_of(WEIGHTS))
    assert store.add_chunk(model.headers, model.body) == 0 and store.sha256[0] == SHA
    first, second = t.receive(IDENT, 0.1), t.receive(IDENT, 0.1)
    assert first is not None and second is not None
    assert isinstance(parse_message(first.body), RoundAnnouncement)
    assert not getattr(first, "local", False)
    # Handed on as the exact bytes with their signature: the client verifies end to end.
    Verifier(SIGNER.public_key).verify("round", "run-1", BROADCAST, first.body, first.headers)
    assert [c for c in gw.calls if "models" in c[1]] == [("GET", "/api/v1/runs/run-1/models/0")]


def test_a_forged_announcement_is_handed_on_unverified_and_fetches_no_model() -> None:
    gw = Gateway()
    t = _transport(gw)
    unsigned = {"body": _announcement().to_json().decode(), "signature": None}
    gw.queue = [_signed(_announcement(), FORGER), unsigned]
    forged, bare = t.receive(IDENT, 0.1), t.receive(IDENT, 0.1)
    assert forged is not None and bare is not None
    assert SIGNATURE_HEADER not in bare.headers
    assert not [c for c in gw.calls if "models" in c[1]]


def test_registration_pins_the_key_and_refuses_another_than_the_pinned_one() -> None:
    gw = Gateway()
    t = _transport(gw)
    kw = {"device_info": {}, "timeout_s": 1.0, "poll_s": 0.1, "stopping": lambda: False}
    ident = t.register("run-1", "d", **kw)  # type: ignore[arg-type]
    assert ident is not None and ident.signing_key == SIGNER.public_key
    with pytest.raises(TrustError, match="not the pinned"):
        t.register("run-1", "d", expected_key=FORGER.public_key, **kw)  # type: ignore[arg-type]


def test_an_upload_the_gateway_refuses_becomes_an_update_rejected_notice() -> None:
    gw = Gateway()
    gw.upload_status = 409
    t = _transport(gw)
    blob = encode(WEIGHTS, Encoding.BF16)
    meta = UpdateMeta(
        run_id="run-1",
        client_id="c-1",
        round=1,
        base_model_version=0,
        num_samples=3,
        encoding="bf16",
        blob_sha256=hashlib.sha256(blob).hexdigest(),
        blob_bytes=len(blob),
    )
    t.attach(IDENT)  # whose bearer token the upload goes with (the envelope has a MAC)
    t.send_update(meta, blob, 1024)
    notice = t.receive(IDENT, 0.1)
    assert notice is not None
    ev = parse_message(notice.body)
    assert isinstance(ev, Event) and ev.kind == "update.rejected"
    assert ev.correlation_id == meta.message_id and ev.detail["reason"] == "round 1 is not open"


def test_a_5xx_or_an_unreachable_gateway_is_a_link_error() -> None:
    t = _transport(Gateway())
    with pytest.raises(LinkError, match="503"):
        t.signal(IDENT, ClientState.READY)

    def down(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    dead = HttpTransport("http://gw", client=httpx.Client(transport=httpx.MockTransport(down)))
    with pytest.raises(LinkError, match="unreachable"):
        dead.heartbeat(IDENT)
    dead.close()
    with pytest.raises(LinkError, match="closed"):
        dead.heartbeat(IDENT)
    assert dead.fatal(LinkError("x"))
