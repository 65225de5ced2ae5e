"""A split run's round attempts start their edge sessions through the orchestrator.

The machine emits ``DispatchEdgeSession`` for a split run's attempt (its fresh devices, not
the carried ones), the projection writes the whole task spec into one outbox row, and the
task claims its session once: a second delivery, or one after the attempt ended, serves
nobody (it would store an untrained body over the trained one).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.queries import orchestrator as oq
from orchestrator.edge import edge_task_id, is_split
from orchestrator.runs import create_run
from orchestrator.state import (
    ClientJoined,
    ClientReady,
    DispatchEdgeSession,
    Federation,
    OpenedRound,
    OpenRound,
    RoundPolicy,
    Tick,
    UpdateReceived,
    from_dict,
    step,
    to_dict,
)
from orchestrator.store import step_run
from protocol.codec import Encoding, encode
from protocol.split import round_session_id
from protocol.tasks import EDGE_QUEUE, EDGE_SESSION_TASK
from workers.edge import rounds
from workers.edge.task import _EDGE_KEYS, _ENGINE_KEYS

POLICY = RoundPolicy(quorum_count=2, deadline_s=10.0, max_attempts=3)


def _ready(fed: Federation, *clients: str) -> Federation:
    for cid in clients:
        fed, _ = step(fed, ClientJoined(cid), 0.0)
        fed, _ = step(fed, ClientReady(cid), 0.0)
    return fed


def test_a_split_runs_attempt_opens_with_its_edge_session_ahead_of_the_announcement() -> None:
    fed = _ready(Federation("r1", POLICY, split=True), "a", "b")
    fed, effects = step(fed, OpenRound(), 1.0)
    kinds = [type(e) for e in effects if isinstance(e, DispatchEdgeSession | OpenedRound)]
    assert kinds == [DispatchEdgeSession, OpenedRound]
    edge = next(e for e in effects if isinstance(e, DispatchEdgeSession))
    assert (edge.round, edge.attempt, edge.devices, edge.deadline) == (1, 1, ("a", "b"), 11.0)
    # A plain run starts no session.
    plain, plain_effects = step(_ready(Federation("r2", POLICY), "a", "b"), OpenRound(), 1.0)
    assert not any(isinstance(e, DispatchEdgeSession) for e in plain_effects)
    assert plain.round is not None


def test_a_retried_attempt_starts_a_session_for_its_fresh_devices_only() -> None:
    fed = _ready(Federation("r1", POLICY, split=True), "a", "b")
    fed, _ = step(fed, OpenRound(), 1.0)
    fed, _ = step(fed, UpdateReceived("a", 1, "sha-a", 10), 2.0)
    fed, effects = step(fed, Tick(), 12.0)  # the deadline, below quorum: attempt 2 opens
    edge = [e for e in effects if isinstance(e, DispatchEdgeSession)]
    assert [(e.round, e.attempt, e.devices) for e in edge] == [(1, 2, ("b",))]
    assert round_session_id("r1", 1, 2) != round_session_id("r1", 1, 1) == "r1-r1"


def test_the_split_flag_survives_the_snapshot() -> None:
    fed = Federation("r1", POLICY, split=True)
    assert from_dict(to_dict(fed)) == fed
    assert from_dict({**to_dict(fed)} | {"split": False}) == replace(fed, split=False)
    old = to_dict(fed)
    del old["split"]  # saved before split runs were the orchestrator's
    assert from_dict(old).split is False


def _split_run(sqlite_url: str) -> tuple[sessionmaker[Session], str]:
    migrations.upgrade(sqlite_url)
    sessions = make_sessionmaker(make_engine(sqlite_url))
    blob = encode({"w": np.zeros((2, 2), np.float32)}, Encoding.FP32)
    model = {"name": "mlp", "num_classes": 10, "input_shape": [64], "seed": 0, "config": {}}
    with session_scope(sessions) as s:
        run_id = create_run(
            s,
            "split",
            blob,
            policy=POLICY,
            train={"lr": 0.1, "momentum": 0.5, "epochs": 2},
            split={"model": model, "edge": {"wait_bound_s": 0.01}},
        )
    with session_scope(sessions) as s:
        for name in ("a", "b"):
            cid = q.register_client(s, run_id, name, q.hash_token(f"token-{name}"))
            step_run(s, run_id, ClientJoined(cid), 0.0)
            step_run(s, run_id, ClientReady(cid), 0.0)
        step_run(s, run_id, OpenRound(), 1.0)
    return sessions, run_id


def test_the_outbox_row_holds_the_sessions_whole_spec(sqlite_url: str) -> None:
    sessions, run_id = _split_run(sqlite_url)
    with session_scope(sessions) as s:
        items = [row.payload for row in oq.pending_outbox(s) if row.kind == "task"]
    assert len(items) == 1
    item = items[0]
    assert item["name"] == EDGE_SESSION_TASK and item["queue"] == EDGE_QUEUE
    assert item["task_id"] == edge_task_id(run_id, 1, 1)
    (spec,) = item["args"]
    assert spec["run_id"] == run_id and (spec["round"], spec["attempt"]) == (1, 1)
    assert spec["session_id"] == round_session_id(run_id, 1, 1)
    assert spec["model"]["name"] == "mlp"
    assert spec["train"] == {"lr": 0.1, "momentum": 0.5}  # the edge's optimiser settings
    assert spec["edge"]["expected_devices"] == 2
    assert spec["edge"]["wait_bound_s"] == 0.01  # the run's edge settings
    assert set(spec["edge"]) <= _EDGE_KEYS | _ENGINE_KEYS  # all of them known to the task


def test_a_session_is_claimed_once_and_not_after_its_attempt(sqlite_url: str) -> None:
    sessions, run_id = _split_run(sqlite_url)
    sid = round_session_id(run_id, 1, 1)
    assert rounds.claim(sessions, run_id, 1, 1, sid) is None
    again = rounds.claim(sessions, run_id, 1, 1, sid)
    assert again is not None and "started already" in again
    assert rounds.attempt_open(sessions, run_id, 1, 1)
    later = rounds.claim(sessions, run_id, 1, 2, round_session_id(run_id, 1, 2))
    assert later is not None and "is over" in later
    assert not rounds.attempt_open(sessions, run_id, 1, 2)


def test_a_run_is_split_only_with_a_model_spec() -> None:
    assert is_split({"split": {"model": {"name": "mlp"}}})
    assert not is_split({"split": {"edge": {}}})
    assert not is_split({"model": {"name": "split-mlp"}})
    assert not is_split(None)
