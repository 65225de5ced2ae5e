"""A minimal scripted device: the reference for the device SDK's wire conventions.

It speaks only the wire (Bus, messages, chunking, codec), exactly as
docs/architecture.md "Wire conventions (devices)" describes:

1. register: declare a reply queue ``device.<reply_key>``, publish ``Register`` (with the
   public half of a fresh X25519 key pair) to ``fedmq.signals`` / ``signal.<reply_key>``,
   wait for ``Registered`` on the reply queue and open its sealed token;
   then declare ``device.<client_id>`` bound to ``device.<client_id>`` and ``broadcast.<run>``
   and delete the reply queue;
2. signal ``ready``; heartbeat every ``heartbeat_s`` (every message signed with
   ``protocol.auth.sign`` under the token, never carrying it);
3. on the device queue: model chunks (headers ``x-fedmq-blob-*`` + ``x-fedmq-envelope`` =
   ``ModelMeta``) are reassembled; a ``RoundAnnouncement`` that selects this client (and
   does not list it in ``carried``) makes it "train" and send its update
   as chunks to ``fedmq.updates`` / ``update.<run>.<round>`` with ``UpdateMeta`` in
   ``x-fedmq-envelope``; ``Event`` notices (``update.accepted``/``update.rejected``) are kept.

All bus calls of one client happen on its own thread (pika connections are per thread).
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol import auth, chunking, sealing, topology
from protocol.bus import Bus
from protocol.codec import Encoding, decode, encode
from protocol.messages import (
    ClientState,
    Event,
    Heartbeat,
    ModelMeta,
    Register,
    Registered,
    RoundAnnouncement,
    Signal,
    UpdateMeta,
    parse_as,
    parse_message,
    registered_context,
)

ENVELOPE_HEADER = "x-fedmq-envelope"


def tiny_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "l1.weight": rng.normal(0, 0.1, (8, 8)).astype(np.float32),
        "l1.bias": np.zeros(8, np.float32),
        "l2.weight": rng.normal(0, 0.1, (8, 8)).astype(np.float32),
        "l2.bias": np.zeros(8, np.float32),
    }


@dataclass
class SentUpdate:
    round: int
    base_version: int
    delta: dict[str, np.ndarray]
    num_samples: int
    message_id: str


@dataclass
class LightClient:
    bus: Bus
    run_id: str
    name: str
    heartbeat_s: float = 0.5
    train_s: float = 0.3  # "training" time before the update goes out
    chunk_size: int = 256  # small, so that even the tiny model travels in several chunks
    chunk_delay_s: float = 0.0
    num_samples: int = 10
    # Scripted behaviour, switched by the test while the client runs.
    silent: bool = False  # no heartbeats, no answers: a device that vanished
    hold_updates: bool = False  # keeps heartbeating but never sends an update
    leave_on_round: int | None = None  # signals offline instead of training this round

    client_id: str | None = None
    token: str | None = None
    models: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    announcements: list[RoundAnnouncement] = field(default_factory=list)
    notices: list[Event] = field(default_factory=list)
    sent: list[SentUpdate] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._registered = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"client-{self.name}", daemon=True)
        self._parts: dict[str, dict[int, bytes]] = {}
        self._done: set[tuple[int, int]] = set()

    # --- control from the test ----------------------------------------------------------

    def start(self, timeout: float = 20.0) -> LightClient:
        self._thread.start()
        if not self._registered.wait(timeout):
            raise TimeoutError(f"{self.name} got no Registered: {self.errors}")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def rounds_trained(self) -> list[int]:
        return [u.round for u in self.sent]

    # --- the device -----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._register()
            self._signal(ClientState.READY)
            self._loop()
        except Exception as e:  # surfaced through .errors to the test
            self.errors.append(repr(e))
            raise

    def _register(self) -> None:
        reply_key = f"r{uuid.uuid4().hex[:16]}"
        reply_queue = topology.declare_device(self.bus, reply_key)
        private, public = sealing.new_keypair()
        reg = Register(
            run_id=self.run_id, display_name=self.name, reply_key=reply_key, reply_pub=public
        )
        self.bus.publish(
            topology.SIGNALS_EXCHANGE, topology.signal_routing_key(reply_key), reg.to_json()
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            d = self.bus.get(reply_queue, timeout=0.5)
            if d is None:
                continue
            d.ack()
            msg = parse_as(d.body, Registered)
            context = registered_context(self.run_id, reply_key, msg.client_id)
            self.client_id = msg.client_id
            self.token = sealing.unseal(msg.sealed_token, private, context)
            topology.declare_device(self.bus, msg.client_id, self.run_id)
            self.bus.delete_queue(reply_queue)
            self._registered.set()
            return
        raise TimeoutError("no Registered")

    def _signal(self, state: ClientState) -> None:
        assert self.client_id and self.token
        sig = auth.sign(
            Signal(run_id=self.run_id, client_id=self.client_id, state=state), self.token
        )
        self.bus.publish(
            topology.SIGNALS_EXCHANGE, topology.signal_routing_key(self.client_id), sig.to_json()
        )

    def _heartbeat(self) -> None:
        assert self.client_id and self.token
        hb = auth.sign(Heartbeat(run_id=self.run_id, client_id=self.client_id), self.token)
        self.bus.publish(
            topology.SIGNALS_EXCHANGE, topology.signal_routing_key(self.client_id), hb.to_json()
        )

    def _loop(self) -> None:
        assert self.client_id
        queue = topology.device_queue(self.client_id)
        last_beat = 0.0
        left = False
        while not self._stop.is_set():
            if not self.silent and not left and time.monotonic() - last_beat >= self.heartbeat_s:
                self._heartbeat()
                last_beat = time.monotonic()
            d = self.bus.get(queue, timeout=0.1)
            if d is None:
                continue
            d.ack()
            if self.silent or left:
                continue
            if chunking.is_chunk(d.headers):
                self._model_chunk(d.headers, d.body)
                continue
            msg = parse_message(d.body)
            if isinstance(msg, Event):
                self.notices.append(msg)
            elif isinstance(msg, RoundAnnouncement):
                self.announcements.append(msg)
                if self.leave_on_round == msg.round:
                    self._signal(ClientState.OFFLINE)
                    left = True
                else:
                    self._on_round(msg)

    def _model_chunk(self, headers: dict[str, Any], body: bytes) -> None:
        chunk = chunking.from_message(headers, body)
        meta = parse_as(headers[ENVELOPE_HEADER], ModelMeta)
        if meta.model_version in self.models:
            return  # a version already held (re-sent with a retry or a later round)
        parts = self._parts.setdefault(chunk.blob_id, {})
        parts[chunk.index] = chunk.data
        if len(parts) == chunk.count:
            blob = b"".join(parts[i] for i in range(chunk.count))
            del self._parts[chunk.blob_id]
            if hashlib.sha256(blob).hexdigest() != meta.blob_sha256:
                self.errors.append(f"model {meta.model_version}: bad sha256")
                return
            self.models[meta.model_version] = decode(blob).tensors

    def _on_round(self, ann: RoundAnnouncement) -> None:
        assert self.client_id
        attempt = ann.attempt
        carried = ann.carried
        if self.client_id not in ann.selected or self.client_id in carried:
            return
        if (ann.round, attempt) in self._done or self.hold_updates:
            return
        self._done.add((ann.round, attempt))
        base = self.models.get(ann.model_version)
        if base is None:
            self.errors.append(f"round {ann.round}: no model version {ann.model_version}")
            return
        self._signal(ClientState.TRAINING)
        time.sleep(self.train_s)
        self.send_update(ann.round, ann.model_version, base)

    def send_update(
        self, round: int, base_version: int, base: dict[str, np.ndarray], **meta_kw: Any
    ) -> SentUpdate:
        """A deterministic "trained" delta, encoded fp32 against ``base``, sent in chunks."""
        assert self.client_id and self.token
        seed = int.from_bytes(hashlib.sha256(f"{self.name}/{round}".encode()).digest()[:4], "big")
        rng = np.random.default_rng(seed)
        delta = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in base.items()}
        trained = {k: base[k] + delta[k] for k in base}
        blob = encode(trained, Encoding.FP32, base=base, base_version=str(base_version))
        decoded = decode(blob)
        delta = {k: np.asarray(v, np.float32) for k, v in decoded.tensors.items()}
        meta = UpdateMeta(
            run_id=self.run_id,
            client_id=self.client_id,
            round=round,
            base_model_version=base_version,
            num_samples=self.num_samples,
            encoding="fp32",
            is_delta=True,
            blob_sha256=hashlib.sha256(blob).hexdigest(),
            blob_bytes=len(blob),
            metrics={"loss": 0.5},
        )
        # Signed under the token (or another one a test passes, to be refused).
        meta = auth.sign(meta, meta_kw.pop("token", self.token))
        envelope = meta.model_dump_json()
        key = topology.update_routing_key(self.run_id, round, self.client_id)
        for chunk in chunking.iter_chunks(blob, self.chunk_size):
            headers = {**chunking.to_headers(chunk), ENVELOPE_HEADER: envelope}
            self.bus.publish(topology.UPDATES_EXCHANGE, key, chunk.data, headers=headers)
            if self.chunk_delay_s:
                time.sleep(self.chunk_delay_s)
        sent = SentUpdate(round, base_version, delta, self.num_samples, meta.message_id)
        self.sent.append(sent)
        self._signal(ClientState.UPDATE)
        return sent
