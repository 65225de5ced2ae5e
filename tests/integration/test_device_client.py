"""A FederatedClient against a scripted fake orchestrator, over InProcessBus and RabbitMQ.

The fake speaks the orchestrator's side of docs/architecture.md "Wire conventions
(devices)": it consumes ``orchestrator.signals`` and ``orchestrator.updates``, answers
``Register``, broadcasts models and round announcements, and checks the updates it gets.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from devices.client import FederatedClient
from devices.config import DeviceConfig, TrainingConfig, TrainSettings, WireConfig
from devices.local import LocalTrainer
from devices.run import run_device
from devices.wire import SentUpdate
from learning.params import Arrays, to_numpy
from protocol import auth, chunking, sealing, signing, topology
from protocol.bus import Bus, BusConfig, BusError, ConnectionLost, InProcessBus, connect
from protocol.codec import Encoding, apply_delta, decode, encode, spec_of
from protocol.messages import (
    ClientState,
    Event,
    Heartbeat,
    Message,
    ModelMeta,
    Register,
    Registered,
    RoundAnnouncement,
    Signal,
    UpdateMeta,
    parse_as,
    parse_message,
    registered_context,
    utcnow,
)
from protocol.signing import Signer, generate_key

RUN = "run-dev"
CID = "c-0001"
TOKEN = "tok-" + "x" * 28
ENVELOPE = "x-fedmq-envelope"


class FakeOrchestrator:
    def __init__(self, bus: Bus, signer: Signer | None = None) -> None:
        self.bus = bus
        topology.declare(bus)
        self.signals: list[ClientState] = []
        self.heartbeats = 0
        # Signs as the real outbox does (protocol/signing.py); tests swap in other signers.
        self.signer = signer or Signer(generate_key()[0])

    def send(
        self,
        key: str,
        body: bytes,
        kind: str,
        *,
        signer: Signer | None = None,
        recipient: str | None = None,
        run: str = RUN,
        headers: dict[str, object] | None = None,
    ) -> None:
        """Publish ``body`` with routing key ``key``, signed by ``signer`` (default: the
        fake's own key; ``UNSIGNED``: no signature) for ``recipient`` (default: what the
        routing key says: the client, or the whole run for ``broadcast.<run>``)."""
        word, _, who = key.partition(".")
        to = recipient or (signing.BROADCAST if word == "broadcast" else who)
        sign = self.signer if signer is None else signer
        hdrs = dict(headers or {})
        if sign is not UNSIGNED:
            hdrs = sign.signed_headers(kind, run, to, body, hdrs)
        self.bus.publish(topology.DEVICES_EXCHANGE, key, body, headers=hdrs or None)

    def _pull(self, timeout: float) -> Message | None:
        d = self.bus.get(topology.SIGNALS_QUEUE, timeout=timeout)
        if d is None:
            return None
        d.ack()
        msg = parse_message(d.body)
        if isinstance(msg, Heartbeat):
            assert auth.check(msg, auth.mac_key(TOKEN), now=time.time(), window_s=60) is None
            self.heartbeats += 1
        elif isinstance(msg, Signal):
            assert msg.client_id == CID
            assert auth.check(msg, auth.mac_key(TOKEN), now=time.time(), window_s=60) is None
            self.signals.append(msg.state)
        return msg

    def wait_signal(self, state: ClientState, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._pull(0.1)
            if isinstance(msg, Signal) and msg.state is state:
                return
        raise AssertionError(f"no {state} signal; got {self.signals}")

    def register(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            msg = self._pull(0.1)
            if isinstance(msg, Register):
                assert msg.run_id == RUN and msg.display_name == "device-1"
                context = registered_context(RUN, msg.reply_key, CID)
                reply = Registered(
                    run_id=RUN,
                    client_id=CID,
                    reply_key=msg.reply_key,
                    sealed_token=sealing.seal(TOKEN, msg.reply_pub, context),
                    signing_key=self.signer.public_key,
                )
                key = topology.device_routing_key(msg.reply_key)
                self.send(key, reply.to_json(), "registered")
                return
        raise AssertionError("no Register")

    def broadcast(self, version: int, weights: Arrays, signer: Signer | None = None) -> str:
        blob = encode(weights, Encoding.FP32)
        sha = hashlib.sha256(blob).hexdigest()
        meta = ModelMeta(
            run_id=RUN,
            model_version=version,
            blob_sha256=sha,
            blob_bytes=len(blob),
            encoding="fp32",
        ).model_dump_json()
        key = topology.broadcast_routing_key(RUN)
        for chunk in chunking.iter_chunks(blob, 8192, f"model-{RUN}-{version}"):
            headers = {**chunking.to_headers(chunk), ENVELOPE: meta}
            self.send(key, chunk.data, signing.MODEL_KIND, signer=signer, headers=headers)
        return sha

    def announce(
        self,
        round: int,
        version: int,
        sha: str,
        attempt: int = 1,
        carried: tuple[str, ...] = (),
        *,
        signer: Signer | None = None,
        deadline_s: float = 60.0,
        run: str = RUN,
    ) -> None:
        ann = RoundAnnouncement(
            run_id=run,
            round=round,
            model_version=version,
            model_sha256=sha,
            model_bytes=1,
            deadline=utcnow() + timedelta(seconds=deadline_s),
            selected=[CID, "c-other"],
            attempt=attempt,
            carried=list(carried),
            train_config={"epochs": 1},
        )
        key = topology.broadcast_routing_key(RUN)
        self.send(key, ann.to_json(), "round", signer=signer, run=run)

    def receive_update(self, timeout: float = 30.0) -> tuple[UpdateMeta, bytes]:
        reassembler = chunking.Reassembler()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._pull(0.0)  # keep the signals flowing
            d = self.bus.get(topology.UPDATES_QUEUE, timeout=0.1)
            if d is None:
                continue
            d.ack()
            meta = parse_as(d.headers[ENVELOPE], UpdateMeta)
            blob = reassembler.add(chunking.from_message(d.headers, d.body))
            if blob is not None:
                return meta, blob
        raise AssertionError("no update")

    def notify(
        self,
        kind: str,
        correlation_id: str,
        *,
        signer: Signer | None = None,
        recipient: str | None = None,
    ) -> None:
        ev = Event(run_id=RUN, client_id=CID, kind=kind, correlation_id=correlation_id)
        key = topology.device_routing_key(CID)
        self.send(key, ev.to_json(), "event", signer=signer, recipient=recipient)


# ``signer=UNSIGNED``: publish with no signature at all.
UNSIGNED = Signer(generate_key()[0])


class FlakyBus(InProcessBus):
    """Loses its "connection" once on a get when ``fail_next`` is set."""

    fail_next = False

    def get(self, queue: str, timeout: float = 0.0):  # type: ignore[no-untyped-def]
        if self.fail_next and queue.startswith("device.c-"):
            self.fail_next = False
            raise ConnectionLost("broker went away (simulated)")
        return super().get(queue, timeout)


@pytest.fixture(
    params=["memory", pytest.param("amqp", marks=pytest.mark.integration)],
)
def make_bus(request: pytest.FixtureRequest) -> Iterator[Callable[[], Bus]]:
    buses: list[Bus] = []

    def make() -> Bus:
        if request.param == "memory":
            bus: Bus = FlakyBus(BusConfig(reconnect_backoff_s=0.05))
        else:
            url = request.getfixturevalue("amqp_url")
            bus = connect(url, BusConfig(reconnect_attempts=3, reconnect_backoff_s=0.1))
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        bus.close()


def _start(bus: Bus) -> tuple[FederatedClient, FakeOrchestrator]:
    config = DeviceConfig(
        run_id=RUN,
        client_index=1,
        num_clients=3,
        wire=WireConfig(heartbeat_s=0.2, poll_s=0.05, chunk_size=4096, progress_signals=True),
    )
    fake = FakeOrchestrator(bus)
    client = FederatedClient(config, bus)
    registrar = threading.Thread(target=fake.register)
    registrar.start()
    client.start(timeout=20)
    registrar.join()
    fake.wait_signal(ClientState.READY)
    return client, fake


def _check_update(
    meta: UpdateMeta, blob: bytes, round: int, version: int, base: Arrays, expected: Arrays
) -> str:
    assert (meta.run_id, meta.client_id, meta.round) == (RUN, CID, round)
    assert auth.check(meta, auth.mac_key(TOKEN), now=time.time(), window_s=600) is None
    assert meta.base_model_version == version and meta.is_delta and meta.encoding == "bf16"
    assert meta.blob_sha256 == hashlib.sha256(blob).hexdigest()
    assert meta.blob_bytes == len(blob) and meta.num_samples > 0
    assert set(meta.metrics) >= {"loss", "accuracy", "train_time_s"}
    decoded = decode(blob, expected=spec_of(base))
    assert decoded.delta and decoded.base_version == str(version)
    applied = apply_delta(base, decoded)
    for name, w in expected.items():
        assert np.all(np.abs(applied[name] - w) <= np.abs(w - base[name]) / 128 + 1e-7), name
    return meta.message_id


def test_two_rounds_against_a_fake_orchestrator(make_bus: Callable[[], Bus]) -> None:
    bus = make_bus()
    client, fake = _start(bus)
    # A twin of the device's trainer: what client 1 must compute in each round.
    twin = LocalTrainer(
        copy.deepcopy(client.trainer.model), client.trainer.x, client.trainer.y, client_index=1
    )
    w0 = to_numpy(twin.model)
    sha0 = fake.broadcast(0, w0)
    fake.announce(1, 0, sha0)
    fake.wait_signal(ClientState.TRAINING)
    fake.wait_signal(ClientState.UPDATE)
    meta1, blob1 = fake.receive_update()
    mid1 = _check_update(meta1, blob1, 1, 0, w0, twin.train(w0, 1, TrainSettings())[0])
    fake.announce(1, 0, sha0)  # a re-broadcast of round 1: must not train again
    fake.notify("update.accepted", mid1)
    fake.wait_signal(ClientState.FINISH)

    w1 = apply_delta(w0, decode(blob1))
    sha1 = fake.broadcast(1, w1)
    fake.announce(2, 1, sha1)
    meta2, blob2 = fake.receive_update()
    mid2 = _check_update(meta2, blob2, 2, 1, w1, twin.train(w1, 2, TrainSettings())[0])
    fake.notify("update.accepted", mid2)
    fake.wait_signal(ClientState.FINISH)
    fake.announce(2, 1, sha1, attempt=2, carried=(CID,))  # carried: must not train again

    time.sleep(0.3)
    client.stop()
    fake.wait_signal(ClientState.OFFLINE)
    assert client.rounds_trained == [1, 2] and client.errors == []
    assert client.accepted == [mid1, mid2] and client.last_metrics is not None
    assert fake.signals == [
        ClientState.READY,
        *[ClientState.TRAINING, ClientState.UPDATE, ClientState.FINISH] * 2,
        ClientState.OFFLINE,
    ]
    assert fake.heartbeats >= 2 and client.left
    with pytest.raises(BusError):
        bus.queue_depth(topology.device_queue(CID))  # the device queue is gone


def test_recovers_after_the_connection_is_lost() -> None:
    bus = FlakyBus(BusConfig(reconnect_backoff_s=0.05))
    try:
        client, fake = _start(bus)
        bus.fail_next = True
        fake.wait_signal(ClientState.JOIN)  # a rejoin, in case it was marked offline
        fake.wait_signal(ClientState.READY)
        w0 = to_numpy(client.trainer.model)
        sha0 = fake.broadcast(0, w0)
        fake.announce(1, 0, sha0)
        meta, _ = fake.receive_update()
        assert meta.round == 1 and client.wait_rounds(1, timeout=5)
        client.stop()
        fake.wait_signal(ClientState.OFFLINE)
        assert any("simulated" in e for e in client.errors)
    finally:
        bus.close()


def test_run_device_trains_its_rounds_then_leaves() -> None:
    name = f"dev-{uuid.uuid4().hex[:8]}"
    bus = InProcessBus.named(name)
    fake = FakeOrchestrator(bus)
    config = DeviceConfig(
        run_id=RUN,
        client_index=1,
        num_clients=3,
        stop_after_rounds=1,
        wire=WireConfig(broker_url=f"memory://{name}", heartbeat_s=0.2, poll_s=0.05),
        training=TrainingConfig(torch_threads=None),
    )
    rounds: list[SentUpdate] = []
    result: list[FederatedClient] = []
    device = threading.Thread(target=lambda: result.append(run_device(config, None, rounds.append)))
    try:
        device.start()
        fake.register()
        fake.wait_signal(ClientState.READY)
        w0 = to_numpy(LocalTrainer.from_config(config).model)
        fake.announce(1, 0, fake.broadcast(0, w0))
        meta, _ = fake.receive_update()
        time.sleep(0.3)
        assert device.is_alive()  # it waits for the answer to its last update
        fake.notify("update.accepted", meta.message_id)
        fake.wait_signal(ClientState.OFFLINE)  # then leaves by itself after its one round
        device.join(10)
        assert not device.is_alive() and [r.round for r in rounds] == [1]
        assert result[0].left and result[0].sent[0].message_id == meta.message_id
    finally:
        bus.close()


# --- the signed control plane (issue 17) -----------------------------------------------------


def _wait_dropped(client: FederatedClient, n: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(client.dropped) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return list(client.dropped)


def test_forged_unsigned_and_replayed_messages_are_dropped_before_they_count(
    make_bus: Callable[[], Bus],
) -> None:
    bus = make_bus()
    client, fake = _start(bus)
    forger = Signer(generate_key()[0])
    w0 = to_numpy(client.trainer.model)
    bogus = {k: v + 1 for k, v in w0.items()}
    # The attack: round 1, attempt 1, deadline already past, forged and unsigned. Either, if
    # believed, would mark (1, 1) as seen and the real announcement below would be skipped.
    fake.announce(1, 0, "0" * 64, signer=forger, deadline_s=-5)
    fake.announce(1, 0, "0" * 64, signer=UNSIGNED, deadline_s=-5)
    # Genuine signatures in the wrong place: signed for another run, and a notice signed
    # for another device replayed onto this one's queue.
    fake.announce(1, 0, "0" * 64, deadline_s=-5, run="run-other")
    fake.notify("client.rejoin", "m" * 16, recipient="c-0002")
    # A forged model under the real version's blob id would poison the real chunks.
    fake.broadcast(0, bogus, signer=forger)
    chunks = len(chunking.split(encode(bogus, Encoding.FP32), 8192))
    reasons = _wait_dropped(client, 4 + chunks)
    assert len(reasons) == 4 + chunks, reasons
    assert sum(r == "unsigned round message" for r in reasons) == 1
    assert sum(r.startswith("round message not signed by the pinned") for r in reasons) == 2
    assert sum(r.startswith("event message not signed by the pinned") for r in reasons) == 1
    assert sum(r.startswith("model message not signed by the pinned") for r in reasons) == chunks
    assert client.announcements == [] and client.notices == [] and client.models.latest() is None
    # The real round still trains.
    sha0 = fake.broadcast(0, w0)
    fake.announce(1, 0, sha0)
    meta, _ = fake.receive_update()
    assert meta.round == 1 and client.wait_rounds(1, timeout=10)
    client.stop()
    assert all(e.startswith("dropped: ") for e in client.errors), client.errors


def test_the_pinned_key_survives_a_restart_and_a_new_one_is_not_taken(
    tmp_path: Path,
) -> None:
    bus = InProcessBus(BusConfig(reconnect_backoff_s=0.05))
    identity = tmp_path / "identity.json"
    config = DeviceConfig(
        run_id=RUN,
        client_index=1,
        num_clients=3,
        wire=WireConfig(heartbeat_s=0.2, poll_s=0.05, identity_file=identity),
        training=TrainingConfig(warm_up=False),
    )
    fake = FakeOrchestrator(bus)
    first = FederatedClient(config, bus)
    registrar = threading.Thread(target=fake.register)
    registrar.start()
    first.start(timeout=20)
    registrar.join()
    assert first.pinned_key == fake.signer.public_key
    assert json.loads(identity.read_text())["signing_key"] == fake.signer.public_key
    first.stop(leave=False)

    # Restarted: resumes from the file and trusts that key, and only that key.
    again = FederatedClient(config, bus).start(timeout=20)
    try:
        assert again.resumed and again.pinned_key == fake.signer.public_key
        fake.wait_signal(ClientState.READY)
        other = Signer(generate_key()[0])
        fake.announce(1, 0, "0" * 64, signer=other)
        assert _wait_dropped(again, 1) and again.announcements == []
        w0 = to_numpy(again.trainer.model)
        fake.announce(1, 0, fake.broadcast(0, w0))
        meta, _ = fake.receive_update()
        assert meta.round == 1
    finally:
        again.stop(leave=False)

    # An orchestrator answering a registration with another key is not believed: a device
    # configured with the first key waits for a reply signed by it, and never gets one.
    impostor = FakeOrchestrator(bus, Signer(generate_key()[0]))
    pinned = DeviceConfig(
        run_id=RUN,
        client_index=1,
        num_clients=3,
        wire=WireConfig(
            poll_s=0.05, register_timeout_s=1.0, orchestrator_key=fake.signer.public_key
        ),
        training=TrainingConfig(warm_up=False),
    )
    stranger = FederatedClient(pinned, bus)
    answering = threading.Thread(target=impostor.register)
    answering.start()
    with pytest.raises(TimeoutError):
        stranger.start(timeout=3)
    answering.join()
    stranger.stop(leave=False)
    assert stranger.client_id is None and stranger.pinned_key == fake.signer.public_key
    bus.close()
