"""The federation benchmark in full mode: where does a round's time go?

Each configuration runs ``fedmq simulate --broker --database``: the orchestrator in this
process, a Celery worker process and K ``fedmq device`` processes on the local RabbitMQ
(a fresh vhost) and PostgreSQL (a fresh database). Each round is then cut into phases from
what the platform stored: participations (each device's training time and when its update
was stored) and events (round closed, aggregation, evaluation, next round opened).

Phases of round r (times from the round's ``opened_at``):
- *first/last update*: when the first and the last update were stored;
- *slowest training*: the largest ``train_time_s`` a device reported;
- *aggregate*: round closed → ``aggregate.done``; *evaluate*: → ``evaluate.done``;
- *reopen*: → the next round's ``opened_at``;
- *cycle*: opened → next opened (the last round: → ``evaluate.done``): the round time a
  user waits; *overhead* = cycle - slowest training.

Called by ``benchmarks/federation.py --full``.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from _scratch import drop_scratch, make_scratch
from rich.console import Console

from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from fedmq.settings import Settings
from learning.replica import ReplicaConfig, run_replica
from protocol.messages import RoundState
from simulation.report import RoundRow
from simulation.simulate import SimOptions, run

PHASES = ("first_update", "last_update", "slowest_training", "aggregate", "evaluate", "reopen")


@dataclass
class FullOutcome:
    clients: int
    partition: str
    rows: list[RoundRow]
    replica: list[float]
    wall_s: float
    phases: list[dict[str, float]] = field(default_factory=list)

    def mean(self, key: str) -> float:
        return statistics.fmean(p[key] for p in self.phases)


def _s(a: datetime | None, b: datetime | None) -> float:
    return float("nan") if a is None or b is None else (b - a).total_seconds()


def phases(database_url: str, run_id: str) -> list[dict[str, float]]:
    engine = make_engine(database_url)
    out: list[dict[str, float]] = []
    try:
        with session_scope(make_sessionmaker(engine)) as s:
            rounds = [r for r in q.list_rounds(s, run_id) if r.state == RoundState.DONE]
            events = q.list_events(
                s, run_id, kinds=["aggregate.done", "evaluate.done"], limit=100_000
            )
            done_at: dict[tuple[str, int], datetime] = {}
            for e in events:
                if e.round is not None:
                    done_at.setdefault((e.kind, e.round), e.ts)
            for i, r in enumerate(rounds):
                parts = [p for p in q.list_participations(s, r.id) if p.received_at]
                got = [p.received_at for p in parts]
                agg = done_at.get(("aggregate.done", r.number))
                ev = done_at.get(("evaluate.done", r.number))
                nxt = rounds[i + 1].opened_at if i + 1 < len(rounds) else ev
                cycle = _s(r.opened_at, nxt)
                slowest = max((p.train_time_s or 0.0) for p in parts) if parts else 0.0
                out.append(
                    {
                        "first_update": _s(r.opened_at, min(got)) if got else float("nan"),
                        "last_update": _s(r.opened_at, max(got)) if got else float("nan"),
                        "slowest_training": slowest,
                        "closed": _s(r.opened_at, r.closed_at),
                        "aggregate": _s(r.closed_at, agg),
                        "evaluate": _s(agg, ev),
                        "reopen": _s(ev, nxt) if i + 1 < len(rounds) else 0.0,
                        "cycle": cycle,
                        "overhead": cycle - slowest,
                    }
                )
    finally:
        engine.dispose()
    return out


def measure(k: int, partition: str, rounds: int, encoding: str = "bf16") -> FullOutcome:
    alpha = {"alpha": 0.5} if partition == "dirichlet" else {}
    replica = run_replica(
        ReplicaConfig(clients=k, rounds=rounds, partition=partition, partition_args=alpha)
    ).accuracy
    scratch = make_scratch("fedmq_bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            options = SimOptions(
                clients=k,
                rounds=rounds,
                partition=partition,
                partition_args=alpha,
                encoding=encoding,
                out=Path(tmp),
                broker=scratch.amqp_url,
                database=scratch.db_url,
            )
            began = time.perf_counter()
            result = run(options, Settings(_env_file=None), Console(file=io.StringIO()))
            wall = time.perf_counter() - began
            return FullOutcome(
                k, partition, result.rows, replica, wall, phases(scratch.db_url, result.run_id)
            )
    finally:
        drop_scratch(scratch)


def render(outcomes: list[FullOutcome]) -> tuple[str, dict[str, Any], bool]:
    head = [
        "K",
        "partition",
        "final %",
        "max gap to replica (pts)",
        "wall s",
        "mean round s (cycle)",
        "first / last update s",
        "slowest training s",
        "aggregate s",
        "evaluate s",
        "reopen s",
        "overhead s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    met = any(o.clients == 10 for o in outcomes)
    for o in outcomes:
        acc = [r.accuracy or 0.0 for r in o.rows]
        gap = max(abs(a - b) for a, b in zip(acc, o.replica, strict=True))
        cycle = o.mean("cycle")
        if o.clients == 10:
            met &= cycle <= 1.0
        lines.append(
            "| "
            + " | ".join(
                [
                    str(o.clients),
                    o.partition,
                    f"{100 * acc[-1]:.2f}",
                    f"{100 * gap:.2f}",
                    f"{o.wall_s:.1f}",
                    f"**{cycle:.2f}**",
                    f"{o.mean('first_update'):.2f} / {o.mean('last_update'):.2f}",
                    f"{o.mean('slowest_training'):.3f}",
                    f"{o.mean('aggregate'):.2f}",
                    f"{o.mean('evaluate'):.2f}",
                    f"{o.mean('reopen'):.2f}",
                    f"{o.mean('overhead'):.2f}",
                ]
            )
            + " |"
        )
    results = {
        "configs": [
            {
                "clients": o.clients,
                "partition": o.partition,
                "accuracy": [r.accuracy for r in o.rows],
                "replica": o.replica,
                "wall_s": o.wall_s,
                "bytes_up": [r.bytes_up for r in o.rows],
                "bytes_down": [r.bytes_down for r in o.rows],
                "phases": o.phases,
            }
            for o in outcomes
        ],
        "target_d_met": met,
    }
    return "\n".join(lines), results, met
