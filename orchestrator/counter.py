"""Counting stored updates: a run's machine stepped through its update inbox under the lock.

Ingest stores an update (blob, message claim, an ``update_inbox`` row) without the run lock,
commits and acknowledges it; several consumers, threads or processes, do that in parallel.
What needs the machine (counting the update, deciding that the round closes) happens here:
the counter locks the run, takes the waiting rows (deleting them in the same transaction),
steps the machine through them in one batch and tells each device whether its update
counted. A rollback puts the rows back; a commit counts each exactly once; rows left by a
crash are counted by the next pass (every start and every tick counts before it steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from db import blobstore
from db import queries as q
from db.queries import orchestrator as oq
from orchestrator.outbox import notify_device
from orchestrator.state import Ignored, UpdateReceived
from orchestrator.store import StepInput, StepResult, UpdateInfo, record_and_publish, step_many
from protocol.messages import Event

# Updates counted in one transaction at most: what waited while the last count ran.
BATCH = 1024


@dataclass(frozen=True)
class Count:
    """What one pass counted: ``results`` of the extra inputs (None: no such run);
    ``steps`` every step of the pass, counted updates' first (for metrics)."""

    accepted: int
    refused: int
    full: bool  # the pass took ``limit`` updates: more may be waiting
    results: list[StepResult] | None
    accepted_bytes: int = 0
    steps: list[StepResult] = field(default_factory=list)


def count(
    s: Session,
    run_id: str,
    now: float,
    *,
    extra: Sequence[StepInput] = (),
    limit: int = BATCH,
) -> Count:
    """Count run ``run_id``'s waiting updates, then step ``extra`` (a tick, a command) after
    them, all under one lock in the caller's transaction: time or an operator never closes a
    round past an update that was already stored."""
    if oq.lock_machine_seq(s, run_id) is None:
        return Count(0, 0, False, None)
    rows = oq.take_inbox(s, run_id, limit)
    inputs = [_input(r) for r in rows]
    results = step_many(s, run_id, [*inputs, *extra], now)
    accepted = accepted_bytes = 0
    refused: list[tuple[oq.Waiting, str]] = []
    for i, row in enumerate(rows):
        refusal = None if results is None else results[i].refusal
        if results is None:
            refused.append((row, f"unknown run {run_id}"))
        elif refusal is not None and not isinstance(refusal, Ignored):
            refused.append((row, refusal.reason))
        else:
            accepted += 1
            accepted_bytes += row.bytes or 0
            notify_update(s, run_id, row.client_id, row.round, row.message_id, None)
    if refused:
        # A refused update must not look stored: its claim and (unless another update or
        # version shares its bytes) its blob go, and its device is told why.
        q.unmark_messages_processed(s, (r.message_id for r, _ in refused))
        blobstore.discard_unreferenced(s, [r.update_sha for r, _ in refused])
        for row, reason in refused:
            record_refused(s, run_id, row.client_id, row.round, row.message_id, reason)
    return Count(
        accepted,
        len(refused),
        len(rows) >= limit,
        None if results is None else results[len(rows) :],
        accepted_bytes,
        results or [],
    )


def _input(row: oq.Waiting) -> StepInput:
    event = UpdateReceived(row.client_id, row.round, row.update_sha, row.num_samples)
    info = UpdateInfo(row.bytes, row.message_id, dict(row.metrics))
    return StepInput(event, row.message_id, update=info)


def record_refused(
    s: Session,
    run_id: str,
    client_id: str,
    round: int,
    message_id: str,
    reason: str,
    *,
    notify: bool = True,
    **detail: str,
) -> None:
    """Record a refused update under its run, client, round and message (and, with
    ``notify``, tell its device)."""
    record_and_publish(
        s,
        run_id,
        "update.refused",
        client_id=client_id,
        round=round,
        message_id=message_id,
        detail={"reason": reason, **detail},
    )
    if notify:
        notify_update(s, run_id, client_id, round, message_id, reason)


def notify_update(
    s: Session, run_id: str, client_id: str, round: int, message_id: str, reason: str | None
) -> None:
    """Tell the device on its own queue whether its update counted (``reason`` None) or
    not."""
    ev = Event(
        run_id=run_id,
        client_id=client_id,
        round=round,
        kind="update.accepted" if reason is None else "update.rejected",
        correlation_id=message_id,
        detail={"reason": reason} if reason else {},
    )
    notify_device(s, ev)
