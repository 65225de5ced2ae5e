"""The orchestrator's snapshot cache against a real database (SQLite and Postgres).

Two engines on one database stand for two orchestrator processes (each engine has its own
cache entries); the pure machine, fed the same events, is the reference state.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import BlobKind, MachinePart, Run
from db.queries import orchestrator as oq
from orchestrator import store
from orchestrator.runs import create_run
from orchestrator.state import (
    Autorun,
    ClientJoined,
    ClientReady,
    Federation,
    Heartbeat,
    Input,
    RoundPolicy,
    UpdateReceived,
    from_dict,
    step,
    to_dict,
)
from orchestrator.state.serde import is_split, join
from orchestrator.store import CACHE, step_run
from protocol.codec import Encoding, encode

pytestmark = pytest.mark.integration

N = 6


@pytest.fixture
def engines(db_url: str) -> Iterator[tuple[Engine, Engine]]:
    migrations.upgrade(db_url)
    a, b = make_engine(db_url), make_engine(db_url)
    yield a, b
    a.dispose()
    b.dispose()


def _run(sessions: sessionmaker[Session], run_id: str | None = None) -> str:
    model = encode({"w": np.zeros(4, np.float32)}, Encoding.FP32)
    with session_scope(sessions) as s:
        return create_run(s, "cache", model, policy=RoundPolicy(min_clients=N), run_id=run_id)


def _clients(sessions: sessionmaker[Session], run_id: str) -> list[str]:
    with session_scope(sessions) as s:
        tokens = [q.hash_token(f"{run_id}-{time.time()}-{i}") for i in range(N)]
        return [q.register_client(s, run_id, f"d{i}", t) for i, t in enumerate(tokens)]


def _stored(sessions: sessionmaker[Session], run_id: str) -> Federation:
    """The snapshot read from the tables, bypassing every cache."""
    with session_scope(sessions) as s:
        got = oq.read_machine(s, run_id)
        assert got is not None and got[1] is not None
        return join(got[1], got[2])


def test_two_processes_stepping_one_run_alternately_stay_correct(
    engines: tuple[Engine, Engine],
) -> None:
    a, b = (make_sessionmaker(e) for e in engines)
    run_id = _run(a)
    cids = _clients(a, run_id)
    with session_scope(a) as s:
        sha = blobstore.put(s, b"an update", BlobKind.UPDATE)
    events: list[Input] = [ClientJoined(c) for c in cids] + [ClientReady(c) for c in cids]
    events += [Autorun(1), Heartbeat(cids[0])]
    events += [UpdateReceived(c, 1, sha, 5) for c in cids]
    reference = Federation(run_id, RoundPolicy(min_clients=N))
    for i, event in enumerate(events):
        now = time.time()
        reference, _ = step(reference, event, now)
        with session_scope(a if i % 2 == 0 else b) as s:
            res = step_run(s, run_id, event, now)
        assert res is not None and res.fed == reference, (i, event)
        # Both "processes" agree with the tables after every step.
        assert _stored(a, run_id) == reference
    assert reference.round is not None and len(reference.round.received) == N
    # The other engine's stale entry was noticed (a miss), not used.
    with session_scope(b) as s:
        assert store.load(s, run_id) == reference
    with session_scope(a) as s:
        r = q.get_round(s, run_id, 1)
        assert r is not None and r.received == N and str(r.state) == "aggregating"


def test_a_rolled_back_step_does_not_reach_the_cache(engines: tuple[Engine, Engine]) -> None:
    a = make_sessionmaker(engines[0])
    run_id = _run(a)
    cids = _clients(a, run_id)
    with session_scope(a) as s:
        step_run(s, run_id, ClientJoined(cids[0]), time.time())
    before = _stored(a, run_id)

    with pytest.raises(RuntimeError), session_scope(a) as s:
        res = step_run(s, run_id, ClientJoined(cids[1]), time.time())
        assert res is not None and cids[1] in res.fed.clients
        raise RuntimeError("the caller fails after the step: the transaction rolls back")

    assert _stored(a, run_id) == before
    entry = CACHE.peek(engines[0], run_id)
    assert entry is None or entry[1] == before
    with session_scope(a) as s:
        assert store.load(s, run_id) == before
        res = step_run(s, run_id, ClientJoined(cids[1]), time.time())
        assert res is not None and res.refusal is None  # not "already joined"
    assert set(_stored(a, run_id).clients) == set(cids[:2])


def test_a_step_that_fails_after_saving_leaves_no_cache_entry(
    engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_sessionmaker(engines[0])
    run_id = _run(a)
    cids = _clients(a, run_id)
    with session_scope(a) as s:
        step_run(s, run_id, ClientJoined(cids[0]), time.time())

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("projection failed")

    monkeypatch.setattr(store, "project", broken)
    with pytest.raises(RuntimeError), session_scope(a) as s:
        step_run(s, run_id, ClientJoined(cids[1]), time.time())
    monkeypatch.undo()

    entry = CACHE.peek(engines[0], run_id)
    assert entry is None or cids[1] not in entry[1].clients
    with session_scope(a) as s:
        res = step_run(s, run_id, ClientJoined(cids[1]), time.time())
        assert res is not None and res.refusal is None
        assert set(res.fed.clients) == set(cids[:2])


def test_consecutive_steps_of_one_process_use_the_cache(engines: tuple[Engine, Engine]) -> None:
    a = make_sessionmaker(engines[0])
    run_id = _run(a)
    cids = _clients(a, run_id)
    with session_scope(a) as s:
        step_run(s, run_id, ClientJoined(cids[0]), time.time())
    hits = CACHE.hits
    for c in cids[1:]:
        with session_scope(a) as s:
            step_run(s, run_id, ClientJoined(c), time.time())
    assert CACHE.hits - hits >= len(cids) - 1
    assert set(_stored(a, run_id).clients) == set(cids)


def test_a_run_made_again_under_the_same_id_is_not_served_from_the_cache(
    engines: tuple[Engine, Engine],
) -> None:
    a = make_sessionmaker(engines[0])
    run_id = _run(a, "again")
    cids = _clients(a, run_id)
    for c in cids:
        with session_scope(a) as s:
            step_run(s, run_id, ClientJoined(c), time.time())
    with session_scope(a) as s:
        s.execute(delete(Run).where(Run.id == run_id))
    _run(a, "again")
    with session_scope(a) as s:
        assert s.scalar(select(MachinePart.key).where(MachinePart.run_id == run_id)) is None
        cid = q.register_client(s, run_id, "new", q.hash_token("new"))
        res = step_run(s, run_id, ClientJoined(cid), time.time())
        assert res is not None and set(res.fed.clients) == {cid}


def test_a_whole_snapshot_is_split_at_its_first_save(engines: tuple[Engine, Engine]) -> None:
    """A run saved by the previous release (the whole machine in ``runs.machine``)."""
    a = make_sessionmaker(engines[0])
    run_id = _run(a)
    cids = _clients(a, run_id)
    fed = Federation(run_id, RoundPolicy(min_clients=N))
    now = time.time()
    for c in cids[:3]:
        fed, _ = step(fed, ClientJoined(c), now)
    with session_scope(a) as s:
        oq.save_machine(s, run_id, to_dict(fed))
        assert store.load(s, run_id) == fed
    fed, _ = step(fed, ClientJoined(cids[3]), now)
    with session_scope(a) as s:
        res = step_run(s, run_id, ClientJoined(cids[3]), now)
        assert res is not None and res.fed == fed
        run = s.get(Run, run_id)
        assert run is not None and run.machine is not None and is_split(run.machine)
        keys = set(s.scalars(select(MachinePart.key).where(MachinePart.run_id == run_id)))
    assert keys == {f"c:{c}" for c in cids[:4]}
    assert _stored(a, run_id) == fed


def test_threads_of_two_processes_stepping_one_run_at_once_lose_nothing(
    engines: tuple[Engine, Engine],
) -> None:
    """Four threads (two per engine) join and ready their own clients concurrently: every
    step waits on the run lock, and a thread that finds another's fresh save waits for its
    publish or reads the database; no client or state change may go missing."""
    a, b = (make_sessionmaker(e) for e in engines)
    run_id = _run(a)
    per_thread = 3
    with session_scope(a) as s:
        cids = [
            q.register_client(s, run_id, f"t{i}", q.hash_token(f"{run_id}-t{i}"))
            for i in range(4 * per_thread)
        ]
    errors: list[BaseException] = []

    def work(sessions: sessionmaker[Session], mine: list[str]) -> None:
        try:
            for c in mine:
                for event in (ClientJoined(c), ClientReady(c)):
                    with session_scope(sessions) as s:
                        res = step_run(s, run_id, event, time.time())
                        assert res is not None and res.refusal is None, (c, event)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [
        threading.Thread(target=work, args=(a if k % 2 else b, cids[k::4])) for k in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    fed = _stored(a, run_id)
    assert set(fed.clients) == set(cids)
    assert all(str(r.state) == "ready" for r in fed.clients.values())
    for sessions in (a, b):
        with session_scope(sessions) as s:
            assert store.load(s, run_id) == fed


def test_downgrading_folds_the_parts_back_into_a_whole_snapshot(db_url: str) -> None:
    migrations.upgrade(db_url)
    engine = make_engine(db_url)
    try:
        a = make_sessionmaker(engine)
        run_id = _run(a)
        cids = _clients(a, run_id)
        with session_scope(a) as s:
            sha = blobstore.put(s, b"an update", BlobKind.UPDATE)
        events: list[Input] = [ClientJoined(c) for c in cids] + [ClientReady(c) for c in cids]
        events += [Autorun(1), UpdateReceived(cids[0], 1, sha, 5)]
        for event in events:
            with session_scope(a) as s:
                step_run(s, run_id, event, time.time())
        fed = _stored(a, run_id)
        assert fed.round is not None and len(fed.round.received) == 1
    finally:
        engine.dispose()

    migrations.downgrade(db_url, "0002")
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            whole = conn.execute(sa.text("SELECT machine FROM runs")).scalar_one()
        whole = json.loads(whole) if isinstance(whole, str) else whole
        assert from_dict(whole) == fed  # what the previous release reads
    finally:
        engine.dispose()

    migrations.upgrade(db_url)
    CACHE.clear()
    engine = make_engine(db_url)
    try:
        with session_scope(engine) as s:
            assert store.load(s, run_id) == fed
            res = step_run(s, run_id, UpdateReceived(cids[1], 1, sha, 5), time.time())
            assert res is not None and res.refusal is None
        assert _stored(make_sessionmaker(engine), run_id) == res.fed
    finally:
        engine.dispose()
