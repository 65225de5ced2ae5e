"""The edge session over the in-process bus: exact split training, many devices, failures."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
import torch

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from devices.split import BusEdge, EdgeUnavailable
from learning.split import split_model, train_split
from orchestrator.runs import create_run
from protocol.bus import InProcessBus
from protocol.codec import Encoding, encode
from protocol.split import SplitRequest, edge_request_queue, edge_session_topology
from tests.split_helpers import (
    TRAIN,
    data,
    edge_in_thread,
    max_relative_error,
    model,
    reference,
    spec,
    train_device,
)
from workers.edge.task import body_state, client_check


def _session() -> str:
    return f"s{uuid.uuid4().hex[:8]}"


def test_one_device_over_the_bus_trains_the_weights_of_unsplit_training() -> None:
    bus, sid = InProcessBus(), _session()
    x, y = data()
    with edge_in_thread(bus, spec(sid, expected_devices=1)) as (engine, names, result):
        device = train_device(bus, sid, "d1", x, y, encoding="fp32")
    got = {**device, **body_state(engine, names)}
    assert max_relative_error(got, reference(x, y)) <= 1e-5
    assert result["devices_seen"] == 1 and result["refused"] == 0
    assert result["groups"] == 2 * 4  # 2 epochs x 4 batches, one device per group


def test_bf16_activations_train_close_to_unsplit_training() -> None:
    bus, sid = InProcessBus(), _session()
    x, y = data()
    with edge_in_thread(bus, spec(sid, expected_devices=1)) as (engine, names, _):
        device = train_device(bus, sid, "d1", x, y)  # bf16 on the wire
    got = {**device, **body_state(engine, names)}
    err = max_relative_error(got, reference(x, y))
    assert 0 < err < 0.05  # bf16 rounding: close, not equal


def test_many_devices_are_batched_into_groups() -> None:
    bus, sid = InProcessBus(), _session()
    parts = [data(48, seed=s) for s in range(3)]
    with edge_in_thread(bus, spec(sid, expected_devices=3, wait_bound_s=0.05)) as (_, _, result):
        threads = [
            threading.Thread(target=train_device, args=(bus, sid, f"d{i}", x, y))
            for i, (x, y) in enumerate(parts)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert result["devices_seen"] == 3 and result["devices_dropped"] == 0
    assert result["rows"] == 3 * 2 * 48  # every sample of every epoch went through
    assert result["groups"] < 3 * 2 * 3  # some groups held more than one device


def test_a_device_gets_a_clear_error_when_no_edge_serves_the_session() -> None:
    bus = InProcessBus()
    edge = BusEdge(bus, "nobody", "d1", connect_timeout_s=0.2)
    with pytest.raises(EdgeUnavailable, match="not serving"):
        edge.forward(torch.zeros(2, 4))
    edge.close()


def test_a_device_times_out_with_a_clear_error_when_the_edge_stops_answering() -> None:
    bus, sid = InProcessBus(), _session()
    # A queue that exists but that nobody serves: the edge hung or died mid-session.
    bus.declare(edge_session_topology(sid))
    edge = BusEdge(bus, sid, "d1", timeout_s=0.3)
    with pytest.raises(EdgeUnavailable, match="did not answer forward"):
        edge.forward(torch.zeros(2, 4))
    edge.close()
    assert bus.queue_depth(edge_request_queue(sid)) == 2  # the forward and the leave


def test_a_request_the_body_cannot_take_fails_only_that_request() -> None:
    bus, sid = InProcessBus(), _session()
    x, y = data()
    with edge_in_thread(bus, spec(sid)) as (_, _, result):
        bad = BusEdge(bus, sid, "bad")
        with pytest.raises(EdgeUnavailable, match="cannot take this input"):
            bad.forward(torch.zeros(4, 99))
        bad.close()
        train_device(bus, sid, "d1", x, y)  # the session still serves
    assert result["refused"] == 1 and result["devices_seen"] == 2


def test_with_overlap_the_next_group_is_staged_before_the_backward_of_this_one() -> None:
    bus, sid = InProcessBus(), _session()
    parts = [data(32, seed=s) for s in range(4)]
    # One device per group (16 rows = one batch), so forwards from others wait while a
    # group is in flight and get staged ahead of its backward.
    session = spec(sid, expected_devices=4, max_batch_rows=16, overlap=True)
    with edge_in_thread(bus, session) as (_, _, result):
        threads = [
            threading.Thread(target=train_device, args=(bus, sid, f"d{i}", x, y))
            for i, (x, y) in enumerate(parts)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert result["staged_ahead"] > 0 and result["refused"] == 0
    assert result["rows"] == 4 * 2 * 32 and result["groups"] == 4 * 2 * 2


def test_a_session_that_authenticates_serves_only_clients_with_their_tokens() -> None:
    """With ``authenticate`` (a run's round, see ``client_check``), a request naming another
    client, or with a wrong token, is refused; a spoofed ``leave`` does not end another
    device's part; the real device trains through."""
    tokens = {"d1": "token-of-d1-0123456789"}
    checked: list[str] = []

    def authenticate(run_id: str, client_id: str, token: str | None) -> str | None:
        checked.append(client_id)
        ok = tokens.get(client_id) is not None and token == tokens[client_id]
        return None if ok else f"unknown client or bad token for {client_id}"

    bus, sid = InProcessBus(), _session()
    x, y = data()
    with edge_in_thread(bus, spec(sid, expected_devices=1), authenticate) as (_, _, result):
        for client, token in (("d1", "not-the-token-0123456789"), ("d9", None)):
            spoof = BusEdge(bus, sid, client, token=token)
            with pytest.raises(EdgeUnavailable, match="bad token"):
                spoof.forward(torch.zeros(4, 64))
            spoof._consumer.stop()  # no leave: that comes next, from a third party
        liar = BusEdge(bus, f"{sid}", "d1x", token="whatever-0123456789")
        liar.client_id = "d1"  # a leave in d1's name, with a wrong token
        liar.close()
        device = train_device(bus, sid, "d1", x, y, token=tokens["d1"])
    assert device  # trained to the end: the spoofed leave did not drop d1
    assert result["refused"] == 3 and result["devices_seen"] == 1
    assert checked.count("d1") == 3  # d1's token is checked once, then trusted


def test_client_check_passes_a_runs_registered_clients_by_their_tokens(sqlite_url: str) -> None:
    migrations.upgrade(sqlite_url)
    sessions = make_sessionmaker(make_engine(sqlite_url))
    blob = encode({"w": np.zeros(2, np.float32)}, Encoding.FP32)
    with session_scope(sessions) as s:
        run = create_run(s, "split-auth", blob)
        other = create_run(s, "another", blob)
        cid = q.register_client(s, run, "d", q.hash_token("the-token-0123456789"))
        stranger = q.register_client(s, other, "d", q.hash_token("strangers-token-012345"))
    check = client_check(sessions, run)
    assert check(run, cid, "the-token-0123456789") is None
    assert check(run, cid, "another-token-0123456") is not None
    assert check(run, cid, None) is not None
    assert check(other, cid, "the-token-0123456789") is not None  # another run's session
    assert check(run, stranger, "strangers-token-012345") is not None  # another run's client
    assert check(run, "nobody", "the-token-0123456789") is not None


def test_split_tensors_travel_only_in_the_float_encodings() -> None:
    """A request's encoding is the codec's ``Encoding``, limited to fp32, bf16 and fp16."""
    base = {
        "run_id": "run1",
        "client_id": "d1",
        "session_id": "s1",
        "phase": "forward",
        "step": 0,
        "correlation_id": "c" * 16,
    }
    assert SplitRequest(**base, encoding="fp16").encoding is Encoding.FP16
    assert SplitRequest(**base).encoding is Encoding.BF16
    for lossy in ("int8", "topk"):
        with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
            SplitRequest(**base, encoding=lossy)


class _GatedEdge(BusEdge):
    """A device link that signals once its first forward is published, and may hold its
    first backward until an event is set: fixes the order in which the edge sees them."""

    def __init__(
        self,
        bus: InProcessBus,
        session_id: str,
        client_id: str,
        sent: threading.Event,
        hold: threading.Event | None,
    ) -> None:
        super().__init__(bus, session_id, client_id, encoding="fp32")
        self.sent, self.hold = sent, hold

    def _publish(self, request: SplitRequest, body: bytes) -> None:
        super()._publish(request, body)
        if request.phase == "forward":
            self.sent.set()

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor:
        if self.hold is not None:
            assert self.hold.wait(30)
        return super().backward(grad_out)


def _two_devices_one_late(overlap: bool) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """d0 alone in the first group; d1's first forward reaches the edge while that group
    awaits its backward (so it waits, as a group's forward does under overlap), then both
    devices share every group. The wait bound is long so that groups never depend on
    timing: the two runs differ only by ``overlap``."""
    bus, sid = InProcessBus(), _session()
    parts = [data(64, seed=s) for s in (1, 2)]
    d0_sent, d1_sent = threading.Event(), threading.Event()
    states: dict[str, dict[str, np.ndarray]] = {}
    session = spec(sid, expected_devices=2, wait_bound_s=5.0, overlap=overlap)

    def device(
        name: str,
        sent: threading.Event,
        hold: threading.Event | None,
        start: threading.Event | None,
    ) -> None:
        if start is not None:
            assert start.wait(30)
        split = split_model(model())
        x, y = parts[int(name[1])]
        with _GatedEdge(bus, sid, name, sent, hold) as edge:
            train_split(split, edge, x, y, **TRAIN)
        keep = split.state_names("head", "tail")
        states[name] = {
            k: v.detach().numpy().copy() for k, v in split.model.state_dict().items() if k in keep
        }

    with edge_in_thread(bus, session) as (engine, names, result):
        threads = [
            threading.Thread(target=device, args=("d0", d0_sent, d1_sent, None)),
            threading.Thread(target=device, args=("d1", d1_sent, None, d0_sent)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    body = body_state(engine, names)
    got = {f"{d}.{k}": v for d, s in states.items() for k, v in s.items()}
    return {**got, **{f"edge.{k}": v for k, v in body.items()}}, result


def test_overlap_trains_the_weights_of_synchronous_serving() -> None:
    """Overlap may not change the math: a device's forward that waits while a group is in
    flight joins the next whole group, as on the synchronous path, instead of being staged
    ahead alone (which split two devices into alternating one-device groups, each body
    step on one device's rows instead of both devices' summed gradient)."""
    sync, sync_result = _two_devices_one_late(overlap=False)
    over, over_result = _two_devices_one_late(overlap=True)
    steps = 2 * 64 // TRAIN["batch_size"]  # per device
    # [d0], then [d1, d0] for the remaining steps of d0, then d1's last step alone.
    assert sync_result["groups"] == over_result["groups"] == steps + 1
    assert over_result["staged_ahead"] == 0 and over_result["refused"] == 0
    assert max_relative_error(over, sync) < 1e-6
