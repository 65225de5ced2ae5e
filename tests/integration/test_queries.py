"""Query functions on both backends: the idempotent writes the round depends on."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import IntegrityError

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, session_scope
from db.models import (
    BlobKind,
    ClientState,
    ModelVersion,
    Participation,
    ParticipationState,
    ProcessedMessage,
    Round,
    RoundState,
    Run,
    RunStatus,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    migrations.upgrade(db_url)
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def run_id(engine: Engine) -> str:
    with session_scope(engine) as s:
        return q.create_run(s, "mnist", {"rounds": 3}).id


def _clients(engine: Engine, run_id: str, n: int) -> list[str]:
    with session_scope(engine) as s:
        return [
            q.register_client(s, run_id, f"device-{i}", q.hash_token(f"token-{i}"))
            for i in range(n)
        ]


def _open_round(engine: Engine, run_id: str, clients: list[str], number: int = 1) -> int:
    with session_scope(engine) as s:
        return q.create_round(s, run_id, number, quorum=len(clients), selected=clients).id


def _update(engine: Engine, round_id: int, client: str, payload: bytes) -> q.UpdateOutcome:
    with session_scope(engine) as s:
        sha = blobstore.put(s, payload, BlobKind.UPDATE)
        return q.record_update(
            s,
            round_id,
            client,
            update_sha=sha,
            num_samples=10,
            nbytes=len(payload),
            loss=0.5,
            message_id=f"msg-{client}",
        )


# --- runs and clients ---


def test_runs_are_created_found_and_moved_between_statuses(engine: Engine, run_id: str) -> None:
    with session_scope(engine) as s:
        assert q.get_run_by_name(s, "mnist").id == run_id  # type: ignore[union-attr]
        assert q.set_run_status(s, run_id, RunStatus.RUNNING, expected=RunStatus.CREATED)
        assert not q.set_run_status(s, run_id, RunStatus.RUNNING, expected=RunStatus.CREATED)
        q.set_autorun(s, run_id, 5)
    with session_scope(engine) as s:
        run = q.get_run(s, run_id)
        assert run is not None
        assert (run.status, run.autorun_remaining, run.config) == (
            RunStatus.RUNNING,
            5,
            {"rounds": 3},
        )
        assert re.fullmatch(r"[0-9a-f]{32}", run_id)
        assert q.create_run(s, "cifar", run_id="cifar-1").id == "cifar-1"  # the wire's id
        assert [r.id for r in q.list_runs(s)] == [run_id, "cifar-1"]
        with pytest.raises(IntegrityError):
            q.create_run(s, "mnist")


def test_a_client_gets_a_deidentified_id_and_only_its_token_hash_is_kept(
    engine: Engine, run_id: str
) -> None:
    with session_scope(engine) as s:
        cid = q.register_client(s, run_id, "Alice's Pixel", q.hash_token("secret"), {"os": "a"})
    assert re.fullmatch(r"[0-9a-f]{32}", cid)
    with session_scope(engine) as s:
        client = q.get_client_by_token_hash(s, q.hash_token("secret"))
        assert client is not None and client.id == cid
        assert client.display_name == "Alice's Pixel" and client.device_info == {"os": "a"}
        assert client.state == ClientState.JOIN
        assert "secret" not in client.token_hash


def test_clients_change_state_and_are_listed_by_state(engine: Engine, run_id: str) -> None:
    a, b, c = _clients(engine, run_id, 3)
    with session_scope(engine) as s:
        assert q.set_client_state(s, a, ClientState.READY, expected=ClientState.JOIN)
        assert q.set_client_state(s, b, ClientState.READY)
        assert not q.set_client_state(s, a, ClientState.TRAINING, expected=ClientState.JOIN)
        assert not q.set_client_state(s, "0" * 32, ClientState.READY)
    with session_scope(engine) as s:
        assert {x.id for x in q.list_clients(s, run_id, ClientState.READY)} == {a, b}
        assert [x.id for x in q.list_clients(s, run_id, [ClientState.JOIN])] == [c]
        # Any str enum with these values (protocol's) works as a state, not as its letters.
        assert [x.id for x in q.list_clients(s, run_id, "join")] == [c]  # type: ignore[arg-type]
        assert len(q.list_clients(s, run_id)) == 3
        assert q.count_clients_by_state(s, run_id) == {ClientState.READY: 2, ClientState.JOIN: 1}


def test_silent_clients_go_offline_and_a_touch_keeps_one_alive(engine: Engine, run_id: str) -> None:
    a, b = _clients(engine, run_id, 2)
    later = datetime.now(UTC) + timedelta(minutes=10)
    with session_scope(engine) as s:
        assert q.touch_client(s, a, now=later + timedelta(seconds=1))
    with session_scope(engine) as s:
        assert q.mark_silent_offline(s, run_id, seen_before=later) == [b]
        assert q.mark_silent_offline(s, run_id, seen_before=later) == []
        client = q.get_client(s, a)
        assert client is not None and client.last_seen == later + timedelta(seconds=1)
        assert client.last_seen.tzinfo is not None  # aware on SQLite too


def test_naive_datetimes_are_refused(engine: Engine, run_id: str) -> None:
    (a,) = _clients(engine, run_id, 1)
    with session_scope(engine) as s, pytest.raises(Exception, match="naive datetime"):
        q.touch_client(s, a, now=datetime(2024, 1, 1))


# --- rounds and participations ---


def test_recording_a_participation_twice_adds_it_once(engine: Engine, run_id: str) -> None:
    a, b = _clients(engine, run_id, 2)
    round_id = _open_round(engine, run_id, [a])
    with session_scope(engine) as s:
        assert not q.record_participation(s, round_id, a)  # selected when the round opened
        assert q.record_participation(s, round_id, b)
        assert not q.record_participation(s, round_id, b)
    with session_scope(engine) as s:
        n = s.scalar(select(func.count()).select_from(Participation))
        assert n == 2


def test_an_update_is_counted_once_however_often_it_is_delivered(
    engine: Engine, run_id: str
) -> None:
    a, b = _clients(engine, run_id, 2)
    round_id = _open_round(engine, run_id, [a, b])

    assert _update(engine, round_id, a, b"w-a") == q.UpdateOutcome.ACCEPTED
    assert _update(engine, round_id, a, b"w-a") == q.UpdateOutcome.DUPLICATE
    assert _update(engine, round_id, a, b"other") == q.UpdateOutcome.DUPLICATE
    with session_scope(engine) as s:
        rnd = s.get_one(Round, round_id)
        assert rnd.received == 1
        assert q.pending_client_ids(s, round_id) == [b]
        (got,) = q.received_updates(s, round_id)
        assert (got.client_id, got.num_samples, got.loss, got.message_id) == (
            a,
            10,
            0.5,
            f"msg-{a}",
        )
        assert blobstore.get(s, got.update_sha or "") == b"w-a"
        assert q.get_client(s, a).rounds_participated == 1  # type: ignore[union-attr]


def test_unselected_late_and_dropped_clients_are_not_counted(engine: Engine, run_id: str) -> None:
    a, b, c, newcomer = _clients(engine, run_id, 4)
    round_id = _open_round(engine, run_id, [a, b, c])
    with session_scope(engine) as s:
        assert q.start_training(s, round_id, a)
        assert q.drop_participant(s, round_id, c)
        assert not q.drop_participant(s, round_id, c)
        assert q.pending_client_ids(s, round_id) == sorted([a, b])

    assert _update(engine, round_id, newcomer, b"n") == q.UpdateOutcome.NOT_SELECTED
    assert _update(engine, round_id, a, b"a") == q.UpdateOutcome.ACCEPTED
    with session_scope(engine) as s:
        assert q.set_round_state(s, round_id, RoundState.AGGREGATING, expected=RoundState.OPEN)
    assert _update(engine, round_id, b, b"b") == q.UpdateOutcome.LATE
    assert _update(engine, round_id, b, b"b") == q.UpdateOutcome.DUPLICATE
    assert _update(engine, round_id, c, b"c") == q.UpdateOutcome.LATE
    with session_scope(engine) as s:
        assert s.get_one(Round, round_id).received == 1
        states = {p.client_id: p.state for p in q.list_participations(s, round_id)}
        assert states == {
            a: ParticipationState.UPDATE,
            b: ParticipationState.LATE,
            c: ParticipationState.LATE,
        }


def test_round_state_moves_only_from_the_expected_state(engine: Engine, run_id: str) -> None:
    (a,) = _clients(engine, run_id, 1)
    round_id = _open_round(engine, run_id, [a])
    t1 = datetime(2030, 1, 1, tzinfo=UTC)
    with session_scope(engine) as s:
        assert q.get_open_round(s, run_id).id == round_id  # type: ignore[union-attr]
        assert q.get_run(s, run_id).current_round == 1  # type: ignore[union-attr]
        assert q.set_round_state(
            s, round_id, RoundState.AGGREGATING, expected=RoundState.OPEN, now=t1
        )
        assert not q.set_round_state(s, round_id, RoundState.AGGREGATING, expected=RoundState.OPEN)
        assert q.set_round_state(
            s,
            round_id,
            RoundState.DONE,
            expected=[RoundState.AGGREGATING, RoundState.EVALUATING],
            now=t1 + timedelta(hours=1),
        )
        q.set_round_metrics(s, round_id, {"loss": 0.3})
        q.set_round_metrics(s, round_id, {"accuracy": 0.9})
    with session_scope(engine) as s:
        rnd = q.get_round(s, run_id, 1)
        assert rnd is not None
        assert rnd.closed_at == t1  # stamped once, when it left open
        assert rnd.metrics == {"loss": 0.3, "accuracy": 0.9}
        assert q.get_open_round(s, run_id) is None
        assert q.latest_round(s, run_id).id == round_id  # type: ignore[union-attr]
        with pytest.raises(IntegrityError):
            q.create_round(s, run_id, 1, quorum=1, selected=[])


# --- model versions ---


def test_a_round_gets_one_model_version_however_often_aggregation_runs(
    engine: Engine, run_id: str
) -> None:
    (a,) = _clients(engine, run_id, 1)
    with session_scope(engine) as s:
        initial, created = q.create_model_version(
            s, run_id, blobstore.put(s, b"m0", BlobKind.MODEL)
        )
        assert created and initial.version == 0 and initial.round_id is None
    round_id = _open_round(engine, run_id, [a])
    with session_scope(engine) as s:
        sha = blobstore.put(s, b"m1", BlobKind.MODEL)
        first, created = q.create_model_version(
            s, run_id, sha, round_id=round_id, metrics={"acc": 0.5}
        )
        assert created and first.version == 1
    with session_scope(engine) as s:
        other = blobstore.put(s, b"m1-rerun", BlobKind.MODEL)
        again, created = q.create_model_version(s, run_id, other, round_id=round_id)
        assert not created
        assert (again.id, again.blob_sha, again.metrics) == (first.id, sha, {"acc": 0.5})
        assert s.get_one(Round, round_id).model_version_id == first.id
        assert [v.version for v in q.list_model_versions(s, run_id)] == [0, 1]
        assert q.latest_model_version(s, run_id).id == first.id  # type: ignore[union-attr]
        assert q.get_model_version(s, run_id, 0).id == initial.id  # type: ignore[union-attr]
    with session_scope(engine) as s, pytest.raises(IntegrityError):
        # The database itself refuses a second version for the round, not just the query.
        s.add(ModelVersion(run_id=run_id, version=2, round_id=round_id, blob_sha=sha))
        s.flush()


# --- processed messages ---


def test_a_message_is_processed_once(engine: Engine) -> None:
    with session_scope(engine) as s:
        assert q.mark_message_processed(s, "m-1")
        assert not q.mark_message_processed(s, "m-1")
    with session_scope(engine) as s:
        assert not q.mark_message_processed(s, "m-1")
        assert q.is_message_processed(s, "m-1")
        assert q.mark_message_processed(s, "m-2")


def test_a_rolled_back_claim_lets_the_redelivery_through(engine: Engine) -> None:
    with pytest.raises(RuntimeError), session_scope(engine) as s:
        assert q.mark_message_processed(s, "m-1")
        raise RuntimeError("handler failed after claiming the message")
    with session_scope(engine) as s:
        assert q.mark_message_processed(s, "m-1")


def test_concurrent_claims_of_one_message_let_exactly_one_through(engine: Engine) -> None:
    results: list[bool] = []
    with session_scope(engine) as first:
        results.append(q.mark_message_processed(first, "m-1"))

        def second() -> None:
            with session_scope(engine) as s:
                results.append(q.mark_message_processed(s, "m-1"))

        worker = threading.Thread(target=second)
        worker.start()
        worker.join(timeout=0.5)
        assert worker.is_alive()  # waits for the first transaction's outcome
    worker.join(timeout=10)
    assert results == [True, False]


def test_old_processed_ids_can_be_pruned(engine: Engine) -> None:
    old = datetime(2020, 1, 1, tzinfo=UTC)
    with session_scope(engine) as s:
        q.mark_message_processed(s, "old", now=old)
        q.mark_message_processed(s, "new")
    with session_scope(engine) as s:
        assert q.prune_processed_messages(s, old + timedelta(days=1)) == 1
        assert s.scalars(select(ProcessedMessage.message_id)).all() == ["new"]


# --- events ---


def test_events_page_newest_first_without_gaps_or_repeats(engine: Engine, run_id: str) -> None:
    with session_scope(engine) as s:
        other = q.create_run(s, "other").id
        for i in range(25):
            q.record_event(
                s,
                "client.ready" if i % 2 else "round.open",
                run_id=run_id,
                round=i,
                detail={"i": i},
            )
            q.record_event(s, "noise", run_id=other)

    pages: list[list[int]] = []
    before: int | None = None
    with session_scope(engine) as s:
        while page := q.list_events(s, run_id, before_id=before, limit=10):
            pages.append([e.detail["i"] for e in page])
            assert all(e.run_id == run_id for e in page)
            before = page[-1].id
        assert [len(p) for p in pages] == [10, 10, 5]
        assert [i for page in pages for i in page] == list(range(24, -1, -1))

        opens = q.list_events(s, run_id, kinds=["round.open"], limit=100)
        assert [e.detail["i"] for e in opens] == list(range(24, -1, -2))
        assert len(q.list_events(s, limit=100)) == 50  # every run

        newest = q.list_events(s, run_id, limit=3)
        tail = q.events_since(s, newest[-1].id, run_id)
        assert [e.id for e in tail] == [e.id for e in reversed(newest[:2])]


def test_deleting_a_run_takes_its_rows_with_it(engine: Engine, run_id: str) -> None:
    (a,) = _clients(engine, run_id, 1)
    round_id = _open_round(engine, run_id, [a])
    _update(engine, round_id, a, b"u")
    with session_scope(engine) as s:
        q.create_model_version(s, run_id, blobstore.put(s, b"m", BlobKind.MODEL), round_id=round_id)
        q.record_event(s, "x", run_id=run_id)
    with session_scope(engine) as s:
        s.delete(s.get_one(Run, run_id))
    with session_scope(engine) as s:
        for table in ("clients", "rounds", "participations", "model_versions", "events"):
            assert s.scalar(text(f"SELECT count(*) FROM {table}")) == 0, table


def test_sqlite_engine_enforces_foreign_keys_and_uses_wal(sqlite_url: str) -> None:
    migrations.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        with pytest.raises(IntegrityError), session_scope(engine) as s:
            q.register_client(s, "no-such-run", "orphan", q.hash_token("x"))
    finally:
        engine.dispose()
