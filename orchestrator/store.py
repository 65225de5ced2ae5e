"""One step of a run's machine inside one database transaction.

``step_run`` locks the run row, loads the ``Federation`` snapshot, steps it, saves it,
projects the effects onto the normalised tables (clients, rounds, participations, events)
and writes the side effects to the outbox. The caller owns the transaction: it commits, then
acknowledges the bus message, then drains the outbox (``orchestrator.outbox``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from db import queries as q
from db.queries import orchestrator as oq
from orchestrator.projection import aggregate_task_id, evaluate_task_id, project, ts
from orchestrator.state import (
    Effect,
    Event,
    Federation,
    Ignored,
    Rejected,
    from_dict,
    step,
    to_dict,
)

__all__ = [
    "StepResult",
    "UpdateInfo",
    "aggregate_task_id",
    "evaluate_task_id",
    "load",
    "record_and_publish",
    "step_run",
    "ts",
]


@dataclass(frozen=True)
class UpdateInfo:
    """What the ingest knows about a stored update beyond the machine's ``UpdateReceived``."""

    nbytes: int
    message_id: str
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    fed: Federation
    effects: list[Effect]

    @property
    def refusal(self) -> Rejected | Ignored | None:
        for e in self.effects:
            if isinstance(e, Rejected | Ignored):
                return e
        return None


def load(s: Session, run_id: str) -> Federation | None:
    """The run's snapshot, read without the lock (for the ticker's task follower)."""
    run = q.get_run(s, run_id)
    return None if run is None or run.machine is None else from_dict(run.machine)


def step_run(
    s: Session,
    run_id: str,
    event: Event,
    now: float,
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
    update: UpdateInfo | None = None,
) -> StepResult | None:
    """Step run ``run_id`` with ``event``; None if the run does not exist (or has no machine)."""
    run = oq.lock_run(s, run_id)
    if run is None or run.machine is None:
        return None
    old = from_dict(run.machine)
    new, effects = step(old, event, now)
    if new != old:
        oq.save_machine(s, run_id, to_dict(new))
        project(s, old, new, effects, now, update)
    for effect in effects:
        _record(s, run_id, effect, message_id, correlation_id)
    return StepResult(new, effects)


def _record(
    s: Session,
    run_id: str,
    effect: Effect,
    message_id: str | None,
    correlation_id: str | None,
) -> None:
    detail = effect.detail()
    client_id = getattr(effect, "client_id", None)
    number = getattr(effect, "number", None)
    if number is None:
        number = getattr(effect, "round", None)
    q.record_event(
        s,
        effect.kind,
        run_id=run_id,
        client_id=client_id,
        round=number,
        message_id=message_id,
        detail=detail,
    )
    oq.add_outbox(
        s,
        run_id,
        "event",
        {
            "kind": effect.kind,
            "client_id": client_id,
            "round": number,
            "correlation_id": correlation_id,
            "detail": detail,
        },
    )


def record_and_publish(
    s: Session,
    run_id: str | None,
    kind: str,
    *,
    client_id: str | None = None,
    round: int | None = None,
    message_id: str | None = None,
    correlation_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """An event that is not a machine effect (a refused message, a command's result)."""
    known = run_id is not None and q.get_run(s, run_id) is not None
    detail = _storable(detail or {})
    q.record_event(
        s,
        kind,
        run_id=run_id if known else None,
        client_id=client_id,
        round=round,
        message_id=message_id,
        detail=detail or {},
    )
    oq.add_outbox(
        s,
        run_id,
        "event",
        {
            "kind": kind,
            "client_id": client_id,
            "round": round,
            "correlation_id": correlation_id,
            "detail": detail or {},
        },
    )


def _storable(value: Any) -> Any:
    """``value`` with NUL characters replaced: refusal reasons quote hostile input, and
    Postgres JSON cannot hold ``\\u0000`` (the insert would fail and the refusal go
    unrecorded; tests/faults/test_bad_input.py found it)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    return value
