"""Group commit (``Signals.handle_many``, ``Ingest.handle_many``) on a real database.

A batch of deliveries is one transaction; each message is still settled on its own, so a
bad message in a batch is dead-lettered alone with its reason while its neighbours count,
and a re-delivered batch counts nothing twice. Deliveries come from a real in-process bus
(the same semantics as RabbitMQ's), handlers run against SQLite and Postgres.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import ParticipationState
from orchestrator.ingest import Ingest
from orchestrator.outbox import ENVELOPE_HEADER, Outbox
from orchestrator.runs import create_run
from orchestrator.signals import Signals
from orchestrator.state import Autorun, RoundPolicy
from orchestrator.store import step_run
from orchestrator.tasks import TaskRunner, TaskStatus
from protocol import chunking, topology
from protocol.bus import REASON_HEADER, Delivery, InProcessBus
from protocol.codec import DecodeLimits, Encoding, encode
from protocol.messages import (
    ClientState,
    Heartbeat,
    Register,
    Registered,
    Signal,
    UpdateMeta,
    parse_as,
)

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
    for i in range(n):
        msg = Register(run_id=st.run_id, display_name=f"d{i}", reply_key=reply_key)
        st.bus.publish(topology.SIGNALS_EXCHANGE, key, msg.to_json())
    st.signals.handle_many(st.take(topology.SIGNALS_QUEUE, n))
    st.outbox.drain()
    tokens = {}
    for d in st.take(replies, n):
        d.ack()
        reg = parse_as(d.body, Registered)
        tokens[reg.client_id] = reg.token
    return tokens


def _signal(st: Stack, cid: str, token: str, state: ClientState = ClientState.READY) -> Signal:
    msg = Signal(run_id=st.run_id, client_id=cid, token=token, state=state)
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
    hb = Heartbeat(run_id=st.run_id, client_id=ids[1], token=tokens[ids[1]])
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
    assert reasons[1] == f"unknown client or bad token for {ids[4]}"

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
    meta = UpdateMeta(
        run_id=st.run_id,
        client_id=cid,
        round=1,
        token=token,
        base_model_version=0,
        num_samples=10,
        encoding="fp32",
        blob_sha256=hashlib.sha256(blob).hexdigest(),
        blob_bytes=len(blob),
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
    assert set(parts().values()) == {ParticipationState.UPDATE}
    with session_scope(st.sessions) as s:
        rnd = q.get_round(s, st.run_id, 1)
        assert rnd is not None and rnd.received == 4 and str(rnd.state) == "aggregating"
        counted = [p.message_id for p in q.list_participations(s, rnd.id)]
    assert metas[0].message_id in counted and metas[1].message_id in counted
