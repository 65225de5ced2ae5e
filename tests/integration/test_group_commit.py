"""Group commit (``Signals.handle_many``, ``Ingest.handle_many``, the counter) on a real
database.

A batch of deliveries is one transaction; each message is still settled on its own, so a
bad message in a batch is dead-lettered alone with its reason while its neighbours are
stored, and a re-delivered batch counts nothing twice. Updates are stored without the run
lock and counted after by ``orchestrator.counter``. Deliveries come from a real in-process
bus (the same semantics as RabbitMQ's), handlers run against SQLite and Postgres.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import ParticipationState
from db.queries import orchestrator as oq
from orchestrator.counter import count
from orchestrator.ingest import Ingest
from orchestrator.outbox import Outbox
from orchestrator.runs import create_run
from orchestrator.signals import Signals
from orchestrator.state import Autorun, RoundPolicy
from orchestrator.store import step_run
from orchestrator.tasks import TaskRunner, TaskStatus
from protocol import auth, chunking, topology
from protocol.bus import REASON_HEADER, Delivery, InProcessBus
from protocol.codec import DecodeLimits, Encoding, encode
from protocol.enveloped import ENVELOPE_HEADER
from protocol.messages import (
    ClientState,
    Heartbeat,
    Registered,
    Signal,
    UpdateMeta,
    parse_as,
    parse_message,
)
from tests.auth_helpers import register, token_of

pytestmark = pytest.mark.integration

MODEL = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


class _NoTasks(TaskRunner):
    def send(self, name: str, args: list[object], task_id: str, queue: str) -> None:
        pass

    def poll(self, task_id: str) -> TaskStatus:
        return TaskStatus("pending")


@dataclass
class Stack:
    bus: InProcessBus
    sessions: sessionmaker[Session]
    run_id: str
    signals: Signals
    ingest: Ingest
    outbox: Outbox

    def take(self, queue: str, n: int) -> list[Delivery]:
        out = []
        for _ in range(n):
            d = self.bus.get(queue, timeout=1.0)
            assert d is not None, f"only {len(out)} of {n} messages on {queue}"
            out.append(d)
        return out

    def count(self) -> int:
        """Count every stored update waiting in the run's inbox (what the service's counter
        thread does); returns how many were counted or refused."""
        done = 0
        while True:
            with session_scope(self.sessions) as s:
                c = count(s, self.run_id, time.time(), limit=2)
            done += c.accepted + c.refused
            if not c.full:
                return done

    def dead(self) -> list[Delivery]:
        out = []
        while (d := self.bus.get(topology.DEAD_LETTER_QUEUE)) is not None:
            d.ack()
            out.append(d)
        return out


@pytest.fixture
def st(db_url: str) -> Iterator[Stack]:
    migrations.upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    bus = InProcessBus(name=f"group-commit-{uuid.uuid4().hex}")
    topology.declare(bus)
    # Four ready clients open a round once autorun is on (the update test turns it on).
    policy = RoundPolicy(min_clients=4, quorum_fraction=1.0, heartbeat_timeout_s=3600)
    with session_scope(sessions) as s:
        run_id = create_run(s, "batch", encode(MODEL, Encoding.FP32), policy=policy)
    yield Stack(
        bus,
        sessions,
        run_id,
        Signals(sessions, lambda: None),
        Ingest(sessions, DecodeLimits(), lambda: None),
        Outbox(bus, sessions, _NoTasks()),
    )
    bus.close()
    engine.dispose()


def _register(st: Stack, n: int, reply_key: str) -> dict[str, str]:
    """Register ``n`` devices in one batch; their tokens by client id."""
    replies = topology.declare_device(st.bus, reply_key)
    key = topology.signal_routing_key(reply_key)
    keys = []
    for i in range(n):
        msg, private = register(st.run_id, f"d{i}", reply_key)
        keys.append(private)
        st.bus.publish(topology.SIGNALS_EXCHANGE, key, msg.to_json())
    st.signals.handle_many(st.take(topology.SIGNALS_QUEUE, n))
    st.outbox.drain()
    tokens = {}
    for d in st.take(replies, n):
        d.ack()
        reg = parse_as(d.body, Registered)
        tokens[reg.client_id] = token_of(reg, keys)
    return tokens


def _signal(st: Stack, cid: str, token: str, state: ClientState = ClientState.READY) -> Signal:
    msg = auth.sign(Signal(run_id=st.run_id, client_id=cid, state=state), token)
    st.bus.publish(
        topology.SIGNALS_EXCHANGE,
        topology.signal_routing_key(cid),
        msg.to_json(),
        message_id=msg.message_id,
    )
    return msg


def test_a_signal_batch_commits_together_and_refuses_only_its_bad_messages(st: Stack) -> None:
    tokens = _register(st, 5, "batchreplies")
    assert len(tokens) == 5
    ids = sorted(tokens)
    sent = [_signal(st, cid, tokens[cid]) for cid in ids[:4]]
    _signal(st, ids[4], "not-the-token-of-this-client")  # refused: bad token
    st.bus.publish(
        topology.SIGNALS_EXCHANGE, topology.signal_routing_key(ids[0]), b"{not json"
    )  # refused: malformed
    hb = auth.sign(Heartbeat(run_id=st.run_id, client_id=ids[1]), tokens[ids[1]])
    st.bus.publish(topology.SIGNALS_EXCHANGE, topology.signal_routing_key(ids[1]), hb.to_json())
    batch = st.take(topology.SIGNALS_QUEUE, 7)
    st.signals.handle_many(batch)

    assert all(d.settled for d in batch)
    with session_scope(st.sessions) as s:
        states = {c.id: str(c.state) for c in q.list_clients(s, st.run_id)}
    assert [states[c] for c in ids] == ["ready"] * 4 + ["join"]
    reasons = sorted(str(d.headers[REASON_HEADER]) for d in st.dead())
    assert len(reasons) == 2
    assert reasons[0].startswith("malformed message")
    assert reasons[1] == f"unknown client or bad MAC for {ids[4]}"

    # The same signals delivered again (a crash after the commit, before the acks) change
    # nothing: each was claimed once.
    for msg in sent:
        st.bus.publish(
            topology.SIGNALS_EXCHANGE,
            topology.signal_routing_key(msg.client_id),
            msg.to_json(),
            message_id=msg.message_id,
        )
    with session_scope(st.sessions) as s:
        before = len(q.list_events(s, st.run_id, limit=10_000))
    again = st.take(topology.SIGNALS_QUEUE, 4)
    st.signals.handle_many(again)
    assert all(d.settled for d in again) and not st.dead()
    with session_scope(st.sessions) as s:
        assert len(q.list_events(s, st.run_id, limit=10_000)) == before


def _update(st: Stack, cid: str, token: str, tensors: dict[str, np.ndarray]) -> UpdateMeta:
    blob = encode(tensors, Encoding.FP32)
    meta = auth.sign(
        UpdateMeta(
            run_id=st.run_id,
            client_id=cid,
            round=1,
            base_model_version=0,
            num_samples=10,
            encoding="fp32",
            blob_sha256=hashlib.sha256(blob).hexdigest(),
            blob_bytes=len(blob),
        ),
        token,
    )
    route = topology.update_routing_key(st.run_id, 1, cid)
    for chunk in chunking.iter_chunks(blob):
        headers = {**chunking.to_headers(chunk), ENVELOPE_HEADER: meta.model_dump_json()}
        st.bus.publish(topology.UPDATES_EXCHANGE, route, chunk.data, headers=headers)
    return meta


def test_an_update_batch_counts_the_good_ones_and_refuses_the_bad_one_alone(st: Stack) -> None:
    tokens = _register(st, 4, "updreplies")
    ids = sorted(tokens)
    for cid in ids:
        _signal(st, cid, tokens[cid])
    st.signals.handle_many(st.take(topology.SIGNALS_QUEUE, 4))
    with session_scope(st.sessions) as s:
        step_run(s, st.run_id, Autorun(1), time.time())  # opens round 1 with all four
    with session_scope(st.sessions) as s:
        rnd = q.get_round(s, st.run_id, 1)
        assert rnd is not None and len(q.list_participations(s, rnd.id)) == 4

    good = {k: np.full_like(v, 0.5) for k, v in MODEL.items()}
    bad = {"w": np.zeros((5, 3), np.float32), "b": np.zeros(3, np.float32)}  # wrong shape
    metas = [_update(st, cid, tokens[cid], good) for cid in ids[:2]]
    _update(st, ids[2], tokens[ids[2]], bad)
    batch = st.take(topology.UPDATES_QUEUE, 3)
    st.ingest.handle_many(batch)
    assert all(d.settled for d in batch)
    dead = st.dead()
    assert len(dead) == 1 and "bad update blob" in str(dead[0].headers[REASON_HEADER])

    def parts() -> dict[str, ParticipationState]:
        with session_scope(st.sessions) as s:
            rnd = q.get_round(s, st.run_id, 1)
            assert rnd is not None
            return {p.client_id: p.state for p in q.list_participations(s, rnd.id)}

    # Stored, not counted yet: the machine counts them in its own step.
    assert [parts()[c] for c in ids] == ["selected"] * 4
    assert st.count() == 2
    p = parts()
    assert [p[c] for c in ids] == ["update", "update", "selected", "selected"]

    # A re-delivered good update and the last two clients' (the refused one resent fixed):
    # the round closes with exactly four counted, none twice.
    _update(st, ids[0], tokens[ids[0]], good)
    for cid in ids[2:]:
        _update(st, cid, tokens[cid], good)
    batch = st.take(topology.UPDATES_QUEUE, 3)
    st.ingest.handle_many(batch)
    assert all(d.settled for d in batch) and not st.dead()
    assert st.count() == 2
    assert set(parts().values()) == {ParticipationState.UPDATE}
    with session_scope(st.sessions) as s:
        rnd = q.get_round(s, st.run_id, 1)
        assert rnd is not None and rnd.received == 4 and str(rnd.state) == "aggregating"
        counted = [p.message_id for p in q.list_participations(s, rnd.id)]
    assert metas[0].message_id in counted and metas[1].message_id in counted


def _open_round(st: Stack) -> dict[str, str]:
    tokens = _register(st, 4, "inboxreplies")
    for cid in sorted(tokens):
        _signal(st, cid, tokens[cid])
    st.signals.handle_many(st.take(topology.SIGNALS_QUEUE, 4))
    with session_scope(st.sessions) as s:
        step_run(s, st.run_id, Autorun(1), time.time())
    return tokens


def _notices(st: Stack, cid: str) -> list[tuple[str, str | None]]:
    """The update notices queued for ``cid``'s device: (kind, reason)."""
    st.outbox.drain()
    out = []
    while (d := st.bus.get(topology.device_queue(cid))) is not None:
        d.ack()
        if chunking.is_chunk(d.headers):
            continue
        msg = parse_message(d.body)
        if msg.type == "event" and str(msg.kind).startswith("update."):
            out.append((str(msg.kind), msg.detail.get("reason")))
    return out


def test_an_update_refused_when_counted_is_told_and_leaves_no_blob_or_claim(st: Stack) -> None:
    tokens = _open_round(st)
    ids = sorted(tokens)
    for cid in ids:
        topology.declare_device(st.bus, cid, st.run_id)
    tensors = {k: np.full_like(v, 0.25) for k, v in MODEL.items()}
    meta = _update(st, ids[0], tokens[ids[0]], tensors)
    st.ingest.handle_many(st.take(topology.UPDATES_QUEUE, 1))
    # Stored and acknowledged; before it is counted its client leaves the federation.
    _signal(st, ids[0], tokens[ids[0]], ClientState.OFFLINE)
    st.signals.handle_many(st.take(topology.SIGNALS_QUEUE, 1))
    assert st.count() == 1
    with session_scope(st.sessions) as s:
        rnd = q.get_round(s, st.run_id, 1)
        assert rnd is not None and rnd.received == 0
        assert not q.is_message_processed(s, meta.message_id)
        assert not blobstore.exists(s, meta.blob_sha256)
        refused = q.list_events(s, st.run_id, kinds=["update.refused"], limit=10)
    assert [e.message_id for e in refused] == [meta.message_id]
    assert [k for k, _ in _notices(st, ids[0])] == ["update.rejected"]


def test_a_second_update_while_the_first_waits_is_a_duplicate_never_counted(st: Stack) -> None:
    tokens = _open_round(st)
    cid = sorted(tokens)[0]
    topology.declare_device(st.bus, cid, st.run_id)
    first = _update(st, cid, tokens[cid], {k: np.full_like(v, 1.0) for k, v in MODEL.items()})
    second = _update(st, cid, tokens[cid], {k: np.full_like(v, 2.0) for k, v in MODEL.items()})
    batch = st.take(topology.UPDATES_QUEUE, 2)
    st.ingest.handle_many(batch)
    assert all(d.settled for d in batch) and not st.dead()
    assert st.count() == 1
    with session_scope(st.sessions) as s:
        rnd = q.get_round(s, st.run_id, 1)
        assert rnd is not None and rnd.received == 1
        (part,) = [p for p in q.list_participations(s, rnd.id) if p.client_id == cid]
        assert part.message_id == first.message_id
        assert not blobstore.exists(s, second.blob_sha256)  # nothing refers to it
        dups = q.list_events(s, st.run_id, kinds=["update.duplicate"], limit=10)
    assert [e.message_id for e in dups] == [second.message_id]
    assert _notices(st, cid) == [("update.accepted", None)]


def test_consumers_store_in_parallel_while_the_counter_counts_each_once(st: Stack) -> None:
    """Four storing threads (no run lock) and a counting one on the same run: every update
    counted exactly once, the round closed with all of them."""
    n = 40
    policy = RoundPolicy(min_clients=n, quorum_fraction=1.0, heartbeat_timeout_s=3600)
    with session_scope(st.sessions) as s:
        st.run_id = create_run(s, "parallel", encode(MODEL, Encoding.FP32), policy=policy)
    tokens = _register(st, n, "parallelreplies")
    for cid in sorted(tokens):
        _signal(st, cid, tokens[cid])
    st.signals.handle_many(st.take(topology.SIGNALS_QUEUE, n))
    with session_scope(st.sessions) as s:
        step_run(s, st.run_id, Autorun(1), time.time())
    metas = [
        _update(st, cid, tokens[cid], {k: np.full_like(v, i) for k, v in MODEL.items()})
        for i, cid in enumerate(sorted(tokens))
    ]
    deliveries = st.take(topology.UPDATES_QUEUE, n)
    done = threading.Event()
    errors: list[BaseException] = []

    def store(part: list[Delivery]) -> None:
        try:
            for k in range(0, len(part), 3):
                st.ingest.handle_many(part[k : k + 3])
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    def counter() -> None:
        try:
            while not done.is_set():
                st.count()
        except BaseException as e:
            errors.append(e)

    stores = [threading.Thread(target=store, args=(deliveries[k::4],)) for k in range(4)]
    counting = threading.Thread(target=counter)
    counting.start()
    for t in stores:
        t.start()
    for t in stores:
        t.join()
    done.set()
    counting.join()
    st.count()
    assert not errors and all(d.settled for d in deliveries) and not st.dead()
    with session_scope(st.sessions) as s:
        rnd = q.get_round(s, st.run_id, 1)
        assert rnd is not None and rnd.received == n and str(rnd.state) == "aggregating"
        counted = sorted(str(p.message_id) for p in q.list_participations(s, rnd.id))
        accepted = q.list_events(s, st.run_id, kinds=["update.accepted"], limit=10_000)
        assert oq.inbox_run_ids(s) == []
    assert counted == sorted(m.message_id for m in metas)
    assert sorted(str(e.message_id) for e in accepted) == counted


def test_a_signal_refused_for_its_token_is_refused_again_when_it_comes_again(st: Stack) -> None:
    """An unauthenticated signal keeps no claim on its message id: delivered again (in a
    later batch, as a resend or a forgery would be), it is dead-lettered again with its
    reason instead of being acknowledged as a message already processed."""
    tokens = _register(st, 1, "againreplies")
    (cid,) = tokens
    bad = _signal(st, cid, "not-the-token-of-this-client")
    st.signals.handle_many(st.take(topology.SIGNALS_QUEUE, 1))
    st.bus.publish(
        topology.SIGNALS_EXCHANGE,
        topology.signal_routing_key(cid),
        bad.to_json(),
        message_id=bad.message_id,
    )
    good = _signal(st, cid, tokens[cid])  # in the same batch as the copy: still applied
    st.signals.handle_many(st.take(topology.SIGNALS_QUEUE, 2))
    reasons = [str(d.headers[REASON_HEADER]) for d in st.dead()]
    assert reasons == [f"unknown client or bad MAC for {cid}"] * 2
    with session_scope(st.sessions) as s:
        assert not q.is_message_processed(s, bad.message_id)
        assert q.is_message_processed(s, good.message_id)
        assert str(q.get_client(s, cid).state) == "ready"  # type: ignore[union-attr]
