"""Read-only queries behind the Streamlit dashboard.

Built for a run with 1,000 clients and 200 rounds: counts and sums are aggregated in SQL
(one grouped query per page, never a row per client or round fetched and summed in Python),
the client table and the event log are paged, and the per-client sums are taken only for
the clients of the page shown.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Integer, and_, case, func, or_, select
from sqlalchemy.orm import Session, aliased

from db.models import (
    Blob,
    Client,
    ClientState,
    Event,
    ModelVersion,
    Participation,
    ParticipationState,
    Round,
    RoundState,
    Run,
    ServiceHealth,
)

# Event kinds that record a refused (and, on the bus, dead-lettered) message, with the reason
# in ``detail.reason``. A command's refusal is a ``command.result`` with ``accepted: false``.
REFUSAL_KINDS = (
    "rejected",
    "auth.rejected",
    "register.rejected",
    "signal.refused",
    "update.refused",
    "update.rejected",
)
COMMAND_RESULT = "command.result"


@dataclass(frozen=True)
class RunOverview:
    """The paper's Global Model Status, plus what the dashboard's header needs."""

    run_id: str
    name: str
    status: str
    autorun_remaining: int | None
    current_round: int
    round_state: str | None
    rounds_done: int
    clients: int
    clients_by_state: dict[str, int]
    accuracy: float | None
    loss: float | None
    model_version: int | None
    last_updated: datetime
    # Split runs: the edge body the newest version names (``split_body: {sha256, round}``),
    # with its stored size; None for plain runs.
    edge_body: dict[str, Any] | None = None
    # A run with differential privacy: the newest version's ε, δ, budget and (when spent)
    # why no round opens any more; None for runs without DP.
    privacy: dict[str, Any] | None = None


@dataclass(frozen=True)
class ClientRow:
    id: str
    display_name: str
    state: str
    last_seen: datetime
    rounds_participated: int
    samples: int | None
    bytes_sent: int
    last_loss: float | None


@dataclass(frozen=True)
class ClientPage:
    total: int
    rows: list[ClientRow] = field(default_factory=list)


@dataclass(frozen=True)
class RoundStats:
    run_id: str
    number: int
    state: str
    attempt: int
    opened_at: datetime
    closed_at: datetime | None
    duration_s: float | None
    accuracy: float | None
    loss: float | None
    selected: int
    updates: int
    dropped: int
    late: int
    missing: int  # selected, still owed an update when the round closed (stragglers)
    bytes_up: int
    bytes_down: int
    model_bytes: int | None
    epsilon: float | None = None  # the run's ε after this round (DP runs)


def run_overview(session: Session, run_id: str) -> RunOverview | None:
    run = session.get(Run, run_id)
    if run is None:
        return None
    latest = session.execute(
        select(Round.state).where(Round.run_id == run_id).order_by(Round.number.desc()).limit(1)
    ).scalar()
    done = session.execute(
        select(Round.metrics, func.count().over())
        .where(Round.run_id == run_id, Round.state == RoundState.DONE)
        .order_by(Round.number.desc())
        .limit(1)
    ).first()
    metrics: dict[str, Any] = done[0] if done else {}
    newest = session.execute(
        select(ModelVersion.version, ModelVersion.metrics)
        .where(ModelVersion.run_id == run_id)
        .order_by(ModelVersion.version.desc())
        .limit(1)
    ).first()
    version = None if newest is None else newest[0]
    edge_body = _edge_body(session, (newest[1] or {}) if newest else {})
    by_state = {
        str(state): n
        for state, n in session.execute(
            select(Client.state, func.count()).where(Client.run_id == run_id).group_by(Client.state)
        )
    }
    last_event = session.scalar(
        select(Event.ts).where(Event.run_id == run_id).order_by(Event.id.desc()).limit(1)
    )
    return RunOverview(
        run_id=run.id,
        name=run.name,
        status=str(run.status),
        autorun_remaining=run.autorun_remaining,
        current_round=run.current_round,
        round_state=None if latest is None else str(latest),
        rounds_done=int(done[1]) if done else 0,
        clients=sum(by_state.values()),
        clients_by_state=by_state,
        accuracy=_num(metrics.get("accuracy")),
        loss=_num(metrics.get("loss")),
        model_version=version,
        last_updated=max(run.updated_at, last_event) if last_event else run.updated_at,
        edge_body=edge_body,
        privacy=_privacy(run.config or {}, (newest[1] or {}) if newest else {}),
    )


def _privacy(config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any] | None:
    block = config.get("privacy")
    if not isinstance(block, dict):
        return None
    ledger = metrics.get("privacy") or {}
    return {
        "mode": block.get("mode"),
        "epsilon": _num(ledger.get("epsilon")),
        "delta": block.get("delta"),
        "epsilon_budget": block.get("epsilon_budget"),
        "budget_spent": ledger.get("budget_spent"),
    }


def _edge_body(session: Session, metrics: dict[str, Any]) -> dict[str, Any] | None:
    body = metrics.get("split_body")
    if not isinstance(body, dict) or not isinstance(body.get("sha256"), str):
        return None
    size = session.scalar(select(Blob.size).where(Blob.sha256 == body["sha256"]))
    return {"sha256": body["sha256"], "round": body.get("round"), "bytes": size}


def count_clients(
    session: Session, run_id: str, states: Iterable[ClientState | str] | None = None
) -> int:
    stmt = select(func.count()).select_from(Client).where(Client.run_id == run_id)
    if states is not None:
        stmt = stmt.where(Client.state.in_([ClientState(s) for s in states]))
    return int(session.scalar(stmt) or 0)


def client_page(
    session: Session,
    run_id: str,
    *,
    offset: int = 0,
    limit: int = 50,
    states: Iterable[ClientState | str] | None = None,
) -> ClientPage:
    """One page of the client table (in joining order), with each client's sums."""
    states = None if states is None else list(states)
    where = [Client.run_id == run_id]
    if states is not None:
        where.append(Client.state.in_([ClientState(s) for s in states]))
    total = count_clients(session, run_id, states)
    clients = list(
        session.scalars(
            select(Client)
            .where(*where)
            .order_by(Client.joined_at, Client.id)
            .offset(offset)
            .limit(limit)
        )
    )
    ids = [c.id for c in clients]
    sums: dict[str, tuple[int | None, int]] = {}
    last_loss: dict[str, float | None] = {}
    if ids:
        for cid, samples, nbytes in session.execute(
            select(
                Participation.client_id,
                func.max(Participation.num_samples),
                func.coalesce(func.sum(Participation.bytes), 0),
            )
            .where(Participation.client_id.in_(ids))
            .group_by(Participation.client_id)
        ):
            sums[cid] = (samples, int(nbytes or 0))
        newest = (
            select(
                Participation.client_id,
                Participation.loss,
                func.row_number()
                .over(
                    partition_by=Participation.client_id, order_by=Participation.received_at.desc()
                )
                .label("rn"),
            )
            .where(Participation.client_id.in_(ids), Participation.loss.is_not(None))
            .subquery()
        )
        last_loss = dict(
            session.execute(select(newest.c.client_id, newest.c.loss).where(newest.c.rn == 1)).all()
        )
    rows = [
        ClientRow(
            id=c.id,
            display_name=c.display_name,
            state=str(c.state),
            last_seen=c.last_seen,
            rounds_participated=c.rounds_participated,
            samples=sums.get(c.id, (None, 0))[0],
            bytes_sent=sums.get(c.id, (None, 0))[1],
            last_loss=last_loss.get(c.id),
        )
        for c in clients
    ]
    return ClientPage(total=total, rows=rows)


def client_names(session: Session, run_id: str, ids: Iterable[str] | None = None) -> dict[str, str]:
    """Client id -> display name, in joining order: of ``ids`` only (the clients a page
    shows), or of every client of the run (one narrow row each: for small runs only; a
    picker over a large fleet uses ``find_clients``)."""
    stmt = select(Client.id, Client.display_name).where(Client.run_id == run_id)
    if ids is not None:
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        stmt = stmt.where(Client.id.in_(wanted))
    stmt = stmt.order_by(Client.joined_at, Client.id)
    return {cid: name for cid, name in session.execute(stmt)}


def find_clients(session: Session, run_id: str, text: str = "", limit: int = 100) -> dict[str, str]:
    """Client id -> display name for a picker: at most ``limit`` clients in joining order
    whose name contains ``text`` (any case) or whose id starts with it; the first ``limit``
    clients without ``text``. A run of 100,000 devices cannot fill a select box: the
    operator types part of a name or id instead."""
    stmt = select(Client.id, Client.display_name).where(Client.run_id == run_id)
    text = text.strip()
    if text:
        stmt = stmt.where(
            or_(
                Client.display_name.icontains(text, autoescape=True),
                Client.id.startswith(text, autoescape=True),
            )
        )
    stmt = stmt.order_by(Client.joined_at, Client.id).limit(limit)
    return {cid: name for cid, name in session.execute(stmt)}


def round_stats(session: Session, run_ids: Sequence[str]) -> list[RoundStats]:
    """Every round of ``run_ids`` with its participation counts and bytes, in one query.

    bytes_down is the global model each round starts from times the clients selected
    (it is broadcast to each), as ``fedmq simulate`` reports it.
    """
    if not run_ids:
        return []
    p = Participation

    def count(*states: ParticipationState) -> Any:
        return func.sum(case((p.state.in_(states), 1), else_=0)).cast(Integer)

    parts = (
        select(
            p.round_id.label("round_id"),
            func.count().label("selected"),
            count(ParticipationState.UPDATE).label("updates"),
            count(ParticipationState.DROPPED).label("dropped"),
            count(ParticipationState.LATE).label("late"),
            count(ParticipationState.SELECTED, ParticipationState.TRAINING).label("pending"),
            func.coalesce(
                func.sum(case((p.state == ParticipationState.UPDATE, p.bytes), else_=0)), 0
            ).label("bytes_up"),
        )
        .join(Round, Round.id == p.round_id)
        .where(Round.run_id.in_(list(run_ids)))
        .group_by(p.round_id)
        .subquery()
    )
    base = aliased(ModelVersion)
    made = aliased(ModelVersion)
    stmt = (
        select(Round, parts, Blob.size, made.metrics.label("version_metrics"))
        .outerjoin(parts, parts.c.round_id == Round.id)
        .outerjoin(base, base.id == Round.base_version_id)
        .outerjoin(made, made.id == Round.model_version_id)
        .outerjoin(Blob, Blob.sha256 == base.blob_sha)
        .where(Round.run_id.in_(list(run_ids)))
        .order_by(Round.run_id, Round.number)
    )
    out = []
    for row in session.execute(stmt):
        r: Round = row[0]
        m = r.metrics or {}
        finished = r.state in (RoundState.DONE, RoundState.FAILED)
        end = r.closed_at
        duration = _num(m.get("duration_s"))
        if duration is None and end is not None:
            duration = (end - r.opened_at).total_seconds()
        selected = row.selected or 0
        out.append(
            RoundStats(
                run_id=r.run_id,
                number=r.number,
                state=str(r.state),
                attempt=r.attempt,
                opened_at=r.opened_at,
                closed_at=r.closed_at,
                duration_s=duration,
                accuracy=_num(m.get("accuracy")),
                loss=_num(m.get("loss")),
                selected=selected,
                updates=row.updates or 0,
                dropped=row.dropped or 0,
                late=row.late or 0,
                missing=(row.pending or 0) if finished else 0,
                bytes_up=int(row.bytes_up or 0),
                bytes_down=(row.size or 0) * selected,
                model_bytes=row.size,
                epsilon=_num(((row.version_metrics or {}).get("privacy") or {}).get("epsilon")),
            )
        )
    return out


def list_events_filtered(
    session: Session,
    run_id: str,
    *,
    client_id: str | None = None,
    round: int | None = None,
    kinds: Iterable[str] | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[Event]:
    """One page of a run's event log, newest first (keyset paging with ``before_id``)."""
    stmt = select(Event).where(Event.run_id == run_id)
    if client_id:
        stmt = stmt.where(Event.client_id == client_id)
    if round is not None:
        stmt = stmt.where(Event.round == round)
    if kinds:
        stmt = stmt.where(Event.kind.in_(list(kinds)))
    if before_id is not None:
        stmt = stmt.where(Event.id < before_id)
    return list(session.scalars(stmt.order_by(Event.id.desc()).limit(limit)))


def event_kinds(session: Session, run_id: str) -> list[str]:
    """The kinds a run's log holds, for the filter (served by the (kind, id) index)."""
    stmt = select(Event.kind).where(Event.run_id == run_id).group_by(Event.kind)
    return sorted(session.scalars(stmt))


def count_events(session: Session, run_id: str) -> int:
    return int(session.scalar(select(func.count()).where(Event.run_id == run_id)) or 0)


def list_refusals(session: Session, run_id: str, *, limit: int = 100) -> list[Event]:
    """Refused messages (dead-lettered on the bus) and refused commands, newest first.

    Refusals that name no known run (a registration for an unknown run, a malformed message)
    are stored without a run id and shown with every run.
    """
    refused_command = and_(
        Event.kind == COMMAND_RESULT, Event.detail["accepted"].as_boolean().is_(False)
    )
    stmt = (
        select(Event)
        .where(
            or_(Event.run_id == run_id, Event.run_id.is_(None)),
            or_(Event.kind.in_(REFUSAL_KINDS), refused_command),
        )
        .order_by(Event.id.desc())
        .limit(limit)
    )
    return list(session.scalars(stmt))


def command_result(session: Session, message_id: str) -> Event | None:
    """The orchestrator's answer to the command with this message id, once it has one."""
    return session.scalar(
        select(Event)
        .where(Event.kind == COMMAND_RESULT, Event.message_id == message_id)
        .order_by(Event.id)
        .limit(1)
    )


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


# --- services (``service_health``) ---------------------------------------------------------

# States a service's own row may be left in on purpose: an old row in one of them is not a
# service gone silent.
AT_REST = ("stopped", "exited", "crash-loop")


@dataclass(frozen=True)
class ServiceRow:
    name: str
    kind: str
    host: str
    pid: int
    state: str  # as written, or "silent" for a row not written within ``stale_after_s``
    since: datetime | None
    attempts: int
    reconnects: int
    seen_at: datetime
    last_error: str | None

    @property
    def healthy(self) -> bool:
        return self.state in ("connected", "running", "stopped", "exited")


def service_health(
    session: Session, now: datetime, stale_after_s: float = 30.0, hide_after_s: float = 600.0
) -> list[ServiceRow]:
    """Every service's last word, by kind and name; a row older than ``stale_after_s`` (a
    heartbeat is every 5 s) reads ``silent``: its process is gone. Rows not written for
    ``hide_after_s`` are left out (a replaced process's), except a crash loop's."""
    rows = session.scalars(select(ServiceHealth).order_by(ServiceHealth.kind, ServiceHealth.name))
    out = []
    for r in rows:
        age = (now - r.seen_at).total_seconds()
        if age > hide_after_s and r.state != "crash-loop":
            continue
        silent = age > stale_after_s and r.state not in AT_REST
        out.append(
            ServiceRow(
                name=r.name,
                kind=r.kind,
                host=r.host,
                pid=r.pid,
                state="silent" if silent else r.state,
                since=r.seen_at if silent else r.since,
                attempts=r.attempts,
                reconnects=r.reconnects,
                seen_at=r.seen_at,
                last_error=(r.detail or {}).get("last_error"),
            )
        )
    return out


@dataclass(frozen=True)
class VersionStep:
    """One version of an async (FedBuff) run: the step that built it, its updates'
    stalenesses and clients, and its evaluation."""

    round: int
    version: int
    created_at: datetime
    seconds: float  # since the run was created
    accuracy: float | None
    loss: float | None
    staleness: list[int]
    clients: list[str]  # the devices whose updates it folded, in client-id order


def is_async_run(session: Session, run_id: str) -> bool:
    run = session.get(Run, run_id)
    policy = (run.config or {}).get("policy") if run is not None else None
    return isinstance(policy, dict) and policy.get("mode") == "async"


def version_steps(session: Session, run_id: str) -> list[VersionStep]:
    """Every version an async run built, oldest first, in two queries (the steps with
    their versions, then their counted updates' clients)."""
    run = session.get(Run, run_id)
    if run is None:
        return []
    made = aliased(ModelVersion)
    rows = session.execute(
        select(Round, made)
        .join(made, made.id == Round.model_version_id)
        .where(Round.run_id == run_id)
        .order_by(made.version)
    ).all()
    who: dict[int, list[str]] = {}
    for round_id, client_id in session.execute(
        select(Participation.round_id, Participation.client_id)
        .join(Round, Round.id == Participation.round_id)
        .where(Round.run_id == run_id, Participation.state == ParticipationState.UPDATE)
        .order_by(Participation.client_id)
    ):
        who.setdefault(round_id, []).append(client_id)
    start = _aware(run.created_at)
    out = []
    for r, mv in rows:
        m, vm = r.metrics or {}, mv.metrics or {}
        created = _aware(mv.created_at)
        out.append(
            VersionStep(
                round=r.number,
                version=mv.version,
                created_at=created,
                seconds=max(0.0, (created - start).total_seconds()),
                accuracy=_num(m.get("accuracy")),
                loss=_num(m.get("loss")),
                staleness=[int(s) for s in vm.get("staleness") or []],
                clients=who.get(r.id, []),
            )
        )
    return out


def _aware(t: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored one is UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)
