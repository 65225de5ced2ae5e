"""Projection of a step onto the normalised tables and the outbox.

The snapshot (``runs.machine``) is the machine's truth; these rows are what workers, the
dashboard and the queries read: client state and last seen, the round row and its
participations, counted updates, autorun, and the outbox rows for side effects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from db import blobstore
from db import queries as q
from db.models import ParticipationState, RoundState, RunStatus
from db.queries import orchestrator as oq
from orchestrator import edge, secagg_wire
from orchestrator.state import (
    ClientStateChanged,
    DispatchAggregate,
    Dispatched,
    DispatchEdgeSession,
    DispatchEvaluate,
    Effect,
    Federation,
    Ignored,
    OpenedRound,
    Rejected,
    Round,
    RoundDone,
    RoundFailed,
    SecAggSend,
    StaleDropped,
    UpdateAccepted,
    VersionStepOpened,
)
from protocol.tasks import AGGREGATE_QUEUE, AGGREGATE_TASK, EVALUATE_QUEUE, EVALUATE_TASK

if TYPE_CHECKING:
    from orchestrator.store import UpdateInfo

log = logging.getLogger(__name__)


def ts(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC)


def aggregate_task_id(run_id: str, number: int, attempt: int, retry: int) -> str:
    return f"agg-{run_id}-{number}-{attempt}-{retry}"


def evaluate_task_id(run_id: str, number: int, version: int) -> str:
    return f"eval-{run_id}-{number}-{version}"


def run_status(fed: Federation) -> RunStatus:
    """The run's status as the dashboard shows it, derived from the machine's state."""
    rnd = fed.round
    if fed.paused:
        return RunStatus.PAUSED
    if (rnd is not None and (rnd.in_flight or rnd.retry_pending)) or (
        fed.autorun_remaining is not None and fed.autorun_remaining > 0
    ):
        return RunStatus.RUNNING
    if rnd is None:
        return RunStatus.CREATED
    if rnd.state is RoundState.FAILED:
        return RunStatus.FAILED
    return RunStatus.FINISHED


def project(
    s: Session,
    old: Federation,
    new: Federation,
    effects: list[Effect],
    now: float,
    update: UpdateInfo | None,
    changed_clients: Iterable[str] | None = None,
    deferred: list[tuple[int, dict[str, Any]]] | None = None,
) -> None:
    """Project the step ``old`` → ``new``; ``changed_clients``: the ids of the client records
    that changed, if the caller knows them (else every client is compared).

    ``deferred``: counted updates of earlier steps not written yet (a batch's). A step that
    only counts updates adds its own there and writes nothing; any other step writes them
    all first (``record_updates``, a few statements for the lot), so the rows still see
    every update before the step that closes the round. The caller writes what is left.
    """
    run_id = new.run_id
    pending = [] if deferred is None else deferred
    for e in effects:
        if isinstance(e, UpdateAccepted):
            pending.append((e.round, _update_row(e, update, now)))
    if deferred is not None and _counts_only(old, new, effects):
        return
    # Updates first: record_updates counts only into a round the db still has open, and
    # the update that completes a round closes it in this same step.
    write_updates(s, run_id, pending)
    project_clients(s, old, new, now, changed_clients)
    if new.round is not None:
        _project_round(s, old, new)
    if new.autorun_remaining != old.autorun_remaining:
        q.set_autorun(s, run_id, new.autorun_remaining)
    if (status := run_status(new)) != run_status(old):
        q.set_run_status(s, run_id, status)
    for e in effects:
        if isinstance(e, OpenedRound):
            oq.add_outbox(
                s,
                run_id,
                "broadcast",
                {
                    "round": e.number,
                    "attempt": e.attempt,
                    "model_version": e.model_version,
                    "selected": list(e.selected),
                    "carried": list(e.carried),
                    "deadline": e.deadline,
                },
            )
        elif isinstance(e, Dispatched):
            # An async slot: the announcement and the model to that one device.
            oq.add_outbox(
                s,
                run_id,
                "broadcast",
                {
                    "round": e.ticket,
                    "attempt": 1,
                    "model_version": e.model_version,
                    "selected": [e.client_id],
                    "carried": [],
                    "deadline": e.deadline,
                    "to": e.client_id,
                },
            )
        elif isinstance(e, VersionStepOpened):
            _project_version_step(s, run_id, e, now)
        elif isinstance(e, SecAggSend):
            secagg_wire.queue_send(s, new, e)
        elif isinstance(e, StaleDropped) and e.ref not in {u.ref for u in new.buffer.updates}:
            # Never folded: its blob goes (unless something else refers to the same bytes).
            blobstore.discard_unreferenced(s, [e.ref])
        elif isinstance(e, DispatchAggregate):
            tid = aggregate_task_id(run_id, e.round, e.attempt, e.retry)
            args: list[Any] = [run_id, e.round, e.attempt]
            material = secagg_wire.store_material(s, new, e.round, e.attempt)
            if material is not None:
                args.append(material)  # a secure round: what the worker unmasks with
            oq.add_outbox(
                s,
                run_id,
                "task",
                {
                    "name": AGGREGATE_TASK,
                    "args": args,
                    "task_id": tid,
                    "queue": AGGREGATE_QUEUE,
                },
            )
        elif isinstance(e, DispatchEdgeSession):
            _dispatch_edge(s, run_id, e, now)
        elif isinstance(e, DispatchEvaluate):
            tid = evaluate_task_id(run_id, e.round, e.model_version)
            oq.add_outbox(
                s,
                run_id,
                "task",
                {
                    "name": EVALUATE_TASK,
                    "args": [run_id, e.round, e.model_version],
                    "task_id": tid,
                    "queue": EVALUATE_QUEUE,
                },
            )
        elif isinstance(e, RoundDone):
            # The step that finishes a round may open the next: the snapshot then no longer
            # shows this one, so its row is finished here.
            rnd = q.get_round(s, run_id, e.number)
            if rnd is not None:
                q.set_round_state(s, rnd.id, RoundState.DONE)
                if e.metrics:
                    q.set_round_metrics(s, rnd.id, dict(e.metrics))
        elif isinstance(e, RoundFailed) and e.final:
            rnd = q.get_round(s, run_id, e.number)
            if rnd is not None:
                q.set_round_state(s, rnd.id, RoundState.FAILED)


def _dispatch_edge(s: Session, run_id: str, e: DispatchEdgeSession, now: float) -> None:
    """The edge session task of a split run's attempt, in the same transaction as the round
    row and its announcement: the outbox row is the one record of it."""
    run = q.get_run(s, run_id)
    try:
        item = edge.outbox_item(run_id, dict(run.config) if run else {}, e, now)
    except ValueError as err:
        # Its devices will find no session and the attempt fail by policy; saying why here.
        log.error("round %s of run %s: no edge session: %s", e.round, run_id, err)
        return
    oq.add_outbox(s, run_id, "task", item)


def _project_version_step(s: Session, run_id: str, e: VersionStepOpened, now: float) -> None:
    """An async version step's round row was made open by ``_project_round``: its buffered
    updates are recorded as its participations' updates (what the aggregate task reads),
    then it is closed as the machine has it."""
    rnd = q.get_round(s, run_id, e.number)
    if rnd is None:
        return
    rows = [
        {
            "client_id": u.client_id,
            "update_sha": u.ref,
            "num_samples": u.num_samples,
            "bytes": 0,
            "loss": None,
            "accuracy": None,
            "train_time_s": None,
            "message_id": None,
            "received_at": ts(now),
        }
        for u in e.updates
    ]
    q.record_updates(s, rnd.id, rows)
    oq.sync_round(
        s, rnd.id, state=RoundState.AGGREGATING, attempt=1, quorum=len(rows), deadline=ts(now)
    )


def write_updates(s: Session, run_id: str, pending: list[tuple[int, dict[str, Any]]]) -> None:
    """Record the counted updates of ``pending`` (round number, row), round by round, and
    empty it."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for number, row in pending:
        by_round.setdefault(number, []).append(row)
    pending.clear()
    for number, rows in by_round.items():
        rnd = q.get_round(s, run_id, number)
        if rnd is not None:
            q.record_updates(s, rnd.id, rows)


def _update_row(e: UpdateAccepted, update: UpdateInfo | None, now: float) -> dict[str, Any]:
    metrics = update.metrics if update else {}
    return {
        "client_id": e.client_id,
        "update_sha": e.ref,
        "num_samples": e.num_samples,
        "bytes": update.nbytes if update else 0,
        "loss": _num(metrics.get("loss")),
        "accuracy": _num(metrics.get("accuracy")),
        "train_time_s": _num(metrics.get("train_time_s")),
        "message_id": update.message_id if update else None,
        "received_at": ts(now),
    }


# Effects whose projection is nothing but the counted update (events are recorded apart).
_COUNTING = (UpdateAccepted, ClientStateChanged, Rejected, Ignored)


def _counts_only(old: Federation, new: Federation, effects: list[Effect]) -> bool:
    """The step changed the round only by counting updates: nothing to write but them."""
    if not _only_received_changed(old.round, new.round):
        return False
    if new.autorun_remaining != old.autorun_remaining or run_status(new) != run_status(old):
        return False
    return all(isinstance(e, _COUNTING) for e in effects)


def _only_received_changed(before: Round | None, after: Round | None) -> bool:
    """The same round attempt, with at most more updates received."""
    if (
        before is None
        or after is None
        or (before.number, before.attempt)
        != (
            after.number,
            after.attempt,
        )
    ):
        return False
    return before == after or replace(before, received=after.received) == after


def project_clients(
    s: Session, old: Federation, new: Federation, now: float, ids: Iterable[str] | None
) -> None:
    """The client rows of ``ids`` (None: every client) as ``new`` has them, where they
    differ from ``old``: one UPDATE for all of them."""
    rows: list[dict[str, Any]] = []
    for cid in new.clients if ids is None else ids:
        rec = new.clients[cid]
        before = old.clients.get(cid)
        state = None
        if before is None or before.state is not rec.state:
            state = rec.state
        seen = None
        if before is None or before.last_seen != rec.last_seen:
            seen = ts(rec.last_seen)
        row: dict[str, Any] = {"id": cid}
        if state is not None:
            row["state"] = state
        if seen is not None:
            row["last_seen"] = seen
        if len(row) > 1:
            rows.append(row)
    oq.project_clients(s, rows)


def _project_round(s: Session, old: Federation, fed: Federation) -> None:
    r = fed.round
    assert r is not None
    before = old.round
    same = before is not None and (before.number, before.attempt) == (r.number, r.attempt)
    if _only_received_changed(before, r):
        # Most steps (signals, heartbeats) leave the round as it was; an update only adds to
        # its received ones, which record_updates counted.
        return
    state = RoundState(r.state.value)
    row = q.get_round(s, fed.run_id, r.number)
    if row is None:
        base = q.get_model_version(s, fed.run_id, r.base_model_version)
        row = q.create_round(
            s,
            fed.run_id,
            r.number,
            quorum=r.quorum,
            selected=r.selected,
            deadline=ts(r.deadline),
            base_version_id=None if base is None else base.id,
            attempt=r.attempt,
            now=ts(r.opened_at),
        )
    else:
        oq.sync_round(
            s, row.id, state=state, attempt=r.attempt, quorum=r.quorum, deadline=ts(r.deadline)
        )
        # The selection is written once per attempt, not on every step.
        for cid in () if same else r.selected:
            if not q.record_participation(s, row.id, cid) and state == RoundState.OPEN:
                # Selected again by a retry after being dropped from a failed attempt.
                oq.set_participation_state(
                    s,
                    row.id,
                    cid,
                    ParticipationState.SELECTED,
                    expected=[ParticipationState.DROPPED],
                )
    for cid in set(r.dropped) - set(before.dropped if same and before else ()):
        q.drop_participant(s, row.id, cid)
    if state == RoundState.FAILED or r.retry_pending:
        # The clients of a failed attempt that never reported are out of it.
        for cid in q.pending_client_ids(s, row.id):
            q.drop_participant(s, row.id, cid)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
