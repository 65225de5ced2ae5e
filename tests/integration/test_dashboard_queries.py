"""The dashboard's read queries on both backends (SQLite for a laptop's `fedmq simulate`
output, Postgres in full mode): sums, counts, paging and the refusal filter."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, session_scope
from db.models import BlobKind, ClientState, ParticipationState, RoundState
from db.queries import dashboard as dq
from db.queries.orchestrator import set_participation_state

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    migrations.upgrade(db_url)
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def run(engine: Engine) -> tuple[str, list[str]]:
    """Round 1 done (a, b counted, c dropped, d late), round 2 open; 1,000-byte model."""
    with session_scope(engine) as s:
        run_id = q.create_run(s, "r").id
        sha = blobstore.put(s, b"m" * 1000, BlobKind.MODEL)
        v0, _ = q.create_model_version(s, run_id, sha)
        ids = [
            q.register_client(s, run_id, f"device-{i}", q.hash_token(f"token-{i}"))
            for i in range(4)
        ]
        r1 = q.create_round(s, run_id, 1, quorum=2, selected=ids, base_version_id=v0.id)
        for k, cid in enumerate(ids[:2]):
            q.record_update(
                s, r1.id, cid, update_sha=sha, num_samples=100 + k, nbytes=300 + k, loss=0.5 + k
            )
        q.drop_participant(s, r1.id, ids[2])
        q.set_round_state(s, r1.id, RoundState.DONE)
        set_participation_state(
            s, r1.id, ids[3], ParticipationState.LATE, expected=[ParticipationState.SELECTED]
        )
        q.set_round_metrics(s, r1.id, {"accuracy": 0.75, "loss": 0.9})
        q.create_model_version(s, run_id, sha, round_id=r1.id)
        r2 = q.create_round(s, run_id, 2, quorum=1, selected=ids[:1], base_version_id=v0.id)
        q.record_update(s, r2.id, ids[0], update_sha=sha, num_samples=100, nbytes=50, loss=0.2)
        q.set_client_state(s, ids[3], ClientState.OFFLINE)
        q.record_event(s, "round.opened", run_id=run_id, round=1)
        q.record_event(s, "update.accepted", run_id=run_id, client_id=ids[0], round=1)
        q.record_event(s, "auth.rejected", run_id=run_id, client_id=ids[1], detail={"reason": "x"})
        for ok, mid in ((True, "cmd-ok"), (False, "cmd-no")):
            q.record_event(
                s,
                "command.result",
                run_id=run_id,
                message_id=mid,
                detail={"action": "pause", "accepted": ok, "reason": None if ok else "no"},
            )
        q.record_event(s, "register.rejected", detail={"reason": "unknown run zz"})
    return run_id, ids


def test_the_overview_counts_states_and_takes_the_last_done_rounds_accuracy(
    engine: Engine, run: tuple[str, list[str]]
) -> None:
    run_id, _ = run
    with session_scope(engine) as s:
        ov = dq.run_overview(s, run_id)
        assert dq.run_overview(s, "nope") is None
    assert ov is not None
    assert (ov.current_round, ov.round_state, ov.rounds_done) == (2, "open", 1)
    assert (ov.clients, ov.clients_by_state) == (4, {"join": 3, "offline": 1})
    assert (ov.accuracy, ov.loss, ov.model_version) == (0.75, 0.9, 1)


def test_the_client_table_pages_and_sums_each_clients_updates(
    engine: Engine, run: tuple[str, list[str]]
) -> None:
    run_id, ids = run
    with session_scope(engine) as s:
        first = dq.client_page(s, run_id, offset=0, limit=3)
        second = dq.client_page(s, run_id, offset=3, limit=3)
        offline = dq.client_page(s, run_id, states=["offline"])
        assert dq.count_clients(s, run_id, ["join"]) == 3
    assert first.total == second.total == 4
    assert [r.id for r in first.rows + second.rows] == ids
    a, b, c = first.rows
    assert (a.bytes_sent, a.samples, a.last_loss, a.rounds_participated) == (350, 100, 0.2, 2)
    assert (b.bytes_sent, b.samples, b.last_loss) == (301, 101, 1.5)
    assert (c.bytes_sent, c.samples, c.last_loss) == (0, None, None)
    assert [r.id for r in offline.rows] == [ids[3]] and offline.total == 1


def test_round_stats_count_participants_stragglers_dropouts_and_bytes(
    engine: Engine, run: tuple[str, list[str]]
) -> None:
    run_id, _ = run
    with session_scope(engine) as s:
        r1, r2 = dq.round_stats(s, [run_id])
        assert dq.round_stats(s, []) == []
    assert (r1.selected, r1.updates, r1.dropped, r1.late, r1.missing) == (4, 2, 1, 1, 0)
    assert (r1.bytes_up, r1.bytes_down, r1.model_bytes) == (601, 4000, 1000)
    assert (r1.accuracy, r1.state) == (0.75, "done") and r1.duration_s is not None
    assert (r2.selected, r2.updates, r2.bytes_up, r2.state, r2.duration_s) == (
        1,
        1,
        50,
        "open",
        None,
    )


def test_the_event_log_filters_and_refusals_include_refused_commands_only(
    engine: Engine, run: tuple[str, list[str]]
) -> None:
    run_id, ids = run
    with session_scope(engine) as s:
        everything = dq.list_events_filtered(s, run_id)
        by_client = dq.list_events_filtered(s, run_id, client_id=ids[0])
        by_round = dq.list_events_filtered(s, run_id, round=1)
        by_kind = dq.list_events_filtered(s, run_id, kinds=["command.result"])
        older = dq.list_events_filtered(s, run_id, before_id=everything[1].id)
        refused = dq.list_refusals(s, run_id)
        kinds = dq.event_kinds(s, run_id)
        answer = dq.command_result(s, "cmd-no")
        assert dq.command_result(s, "cmd-unknown") is None
        assert dq.count_events(s, run_id) == 5
    assert [e.id for e in everything] == sorted((e.id for e in everything), reverse=True)
    assert [e.kind for e in by_client] == ["update.accepted"]
    assert {e.kind for e in by_round} == {"round.opened", "update.accepted"}
    assert [e.message_id for e in by_kind] == ["cmd-no", "cmd-ok"]
    assert [e.id for e in older] == [e.id for e in everything[2:]]
    # The refused command, the bad token and the registration for an unknown run (no run id).
    assert [e.kind for e in refused] == ["register.rejected", "command.result", "auth.rejected"]
    assert kinds == ["auth.rejected", "command.result", "round.opened", "update.accepted"]
    assert answer is not None and answer.detail["accepted"] is False


def test_the_overview_names_a_split_runs_edge_body(engine: Engine) -> None:
    with session_scope(engine) as s:
        run_id = q.create_run(s, "split").id
        head_tail = blobstore.put(s, b"h" * 100, BlobKind.MODEL)
        body = blobstore.put(s, b"b" * 2048, BlobKind.MODEL)
        q.create_model_version(s, run_id, head_tail)
        q.create_model_version(
            s, run_id, head_tail, metrics={"split_body": {"sha256": body, "round": 1}}
        )
    with session_scope(engine) as s:
        ov = dq.run_overview(s, run_id)
    assert ov is not None and ov.model_version == 1
    assert ov.edge_body == {"sha256": body, "round": 1, "bytes": 2048}


def test_a_plain_run_has_no_edge_body(engine: Engine, run: tuple[str, list[str]]) -> None:
    with session_scope(engine) as s:
        ov = dq.run_overview(s, run[0])
    assert ov is not None and ov.edge_body is None


def test_the_client_picker_finds_by_name_or_id_prefix_in_joining_order(
    engine: Engine, run: tuple[str, list[str]]
) -> None:
    run_id, ids = run
    with session_scope(engine) as s:
        assert list(dq.find_clients(s, run_id)) == ids
        assert dq.find_clients(s, run_id, " DEVICE-2 ") == {ids[2]: "device-2"}
        assert ids[1] in dq.find_clients(s, run_id, ids[1][:8])
        assert list(dq.find_clients(s, run_id, "device", limit=2)) == ids[:2]
        # LIKE's wildcards are searched for as characters, not as patterns.
        assert dq.find_clients(s, run_id, "%") == dq.find_clients(s, run_id, "_") == {}
        assert dq.find_clients(s, "nope") == {}
        # Names of the clients a page shows, not of the whole run.
        shown = dq.client_names(s, run_id, [ids[3], ids[0], "someone-else"])
        assert shown == {ids[0]: "device-0", ids[3]: "device-3"}
        assert dq.client_names(s, run_id, []) == {}
        assert list(dq.client_names(s, run_id)) == ids
