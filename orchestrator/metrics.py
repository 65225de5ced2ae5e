"""The orchestrator's Prometheus metrics: what it consumed, counted and sent, and what the
database says about runs, rounds, devices and the outbox.

Counters and histograms live in this process (``prometheus_client``'s default registry)
and are moved where the work is done, after the transaction that did it committed, so a
rolled-back batch counts nothing. The state gauges (``StateCollector``) are read from the
database at each scrape instead: every replica sees the same rounds and devices, and a
gauge kept in memory would drift from the table it mirrors after a restart or beside
another replica. Each replica exports what it did itself; sum over replicas in queries.

Names follow Prometheus's conventions (``_total`` counters, ``_seconds`` and ``_bytes``
units); ``deploy/grafana/dashboards/fedmq.json`` queries them, and a test checks that every
name it queries exists here, in ``workers.metrics`` or in the gateway's instrumentator, and
that every metric defined there has a panel and a line in ``docs/monitoring.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from db.engine import session_scope
from db.queries.metrics import state_counts
from orchestrator.state import (
    RoundDone,
    RoundFailed,
    StaleDropped,
    UpdateBuffered,
    VersionStepOpened,
)

if TYPE_CHECKING:  # the outbox imports this module, and the store imports the outbox
    from orchestrator.store import StepResult
    from protocol.bus import Delivery

log = logging.getLogger(__name__)

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_ROUND_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

MESSAGES = Counter(
    "fedmq_orchestrator_messages",
    "Messages consumed, by queue and how each was settled (ack, reject: dead-lettered "
    "with a reason, requeue, discard)",
    ["queue", "outcome"],
)
BATCH_SIZE = Histogram(
    "fedmq_orchestrator_batch_size",
    "Messages handled in one group-committed batch",
    ["queue"],
    buckets=_BATCH_BUCKETS,
)
BATCH_SECONDS = Histogram(
    "fedmq_orchestrator_batch_seconds",
    "One batch: its transaction (machine steps or stores, commit) and settling it",
    ["queue"],
)
COUNT_SECONDS = Histogram(
    "fedmq_orchestrator_count_seconds",
    "One counting pass over a run's stored updates: lock, steps, commit",
)
UPDATES = Counter(
    "fedmq_orchestrator_updates",
    "Stored updates counted into their round (counted) or refused by the round machine",
    ["outcome"],
)
UPDATE_BYTES = Counter("fedmq_orchestrator_update_bytes", "Bytes of the updates counted (bytes up)")
MODEL_BYTES = Counter(
    "fedmq_orchestrator_model_bytes_published",
    "Bytes of global models published to the broker (bytes down, once per broadcast: the "
    "broker fans them out to the selected devices)",
)
ROUNDS_ENDED = Counter(
    "fedmq_orchestrator_rounds_ended",
    "Round attempts this replica saw end, by outcome (done; failed)",
    ["outcome"],
)
ROUND_SECONDS = Histogram(
    "fedmq_orchestrator_round_seconds",
    "A round attempt from opened to done (aggregated and evaluated)",
    buckets=_ROUND_BUCKETS,
)

# Async (FedBuff) runs speak versions: a step folds the buffer into the next version.
_STALENESS_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 50, 100)
VERSION_STEPS = Counter(
    "fedmq_orchestrator_async_version_steps",
    "Async version steps opened: each folds buffer_size buffered updates into a version",
)
STALENESS = Histogram(
    "fedmq_orchestrator_async_staleness",
    "Versions an async update is behind: on arrival in the buffer (at=buffered) and when "
    "its version step opened (at=folded)",
    ["at"],
    buckets=_STALENESS_BUCKETS,
)
STALE_DROPPED = Counter(
    "fedmq_orchestrator_async_stale_dropped",
    "Buffered async updates dropped unfolded: the model moved past max_staleness while they waited",
)


def observe_deliveries(queue: str, deliveries: Iterable[Delivery]) -> None:
    for d in deliveries:
        MESSAGES.labels(queue, d.outcome or "unsettled").inc()


def observe_batch(queue: str, size: int, seconds: float) -> None:
    BATCH_SIZE.labels(queue).observe(size)
    BATCH_SECONDS.labels(queue).observe(seconds)


def observe_count(accepted: int, refused: int, accepted_bytes: int, seconds: float) -> None:
    COUNT_SECONDS.observe(seconds)
    if accepted:
        UPDATES.labels("counted").inc(accepted)
        UPDATE_BYTES.inc(accepted_bytes)
    if refused:
        UPDATES.labels("refused").inc(refused)


def observe_steps(results: Sequence[StepResult]) -> None:
    """Rounds that ended in these (committed) steps, and an async run's versions."""
    for result in results:
        for effect in result.effects:
            if isinstance(effect, RoundDone):
                ROUNDS_ENDED.labels("done").inc()
                ROUND_SECONDS.observe(effect.seconds)
            elif isinstance(effect, RoundFailed):
                ROUNDS_ENDED.labels("failed").inc()
            elif isinstance(effect, UpdateBuffered):
                STALENESS.labels("buffered").observe(effect.staleness)
            elif isinstance(effect, VersionStepOpened):
                VERSION_STEPS.inc()
                for s in effect.staleness:
                    STALENESS.labels("folded").observe(s)
            elif isinstance(effect, StaleDropped):
                STALE_DROPPED.inc()


class StateCollector(Collector):
    """Gauges read from the database at each scrape: runs by status, rounds by state,
    devices (clients) by state, outbox items waiting to be sent, stored updates waiting
    to be counted. A scrape while the database is away reports ``fedmq_database_up 0``
    and no gauge rather than failing."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("fedmq_database_up", ""), *self._families()]

    def collect(self) -> list[GaugeMetricFamily]:
        up = GaugeMetricFamily("fedmq_database_up", "1 when the state gauges could be read")
        try:
            with session_scope(self.sessions) as s:
                counts = state_counts(s)
        except Exception as e:  # a scrape must not fail because the database is away
            log.warning("metrics: reading the database failed: %r", e)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        runs, rounds, devices, outbox, inbox = families = self._families()
        for family, values in (
            (runs, counts.runs),
            (rounds, counts.rounds),
            (devices, counts.devices),
        ):
            for key, n in values.items():
                family.add_metric([key], n)
        outbox.add_metric([], counts.outbox_pending)
        inbox.add_metric([], counts.inbox_pending)
        return [up, *families]

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("fedmq_runs", "Runs by status", labels=["status"]),
            GaugeMetricFamily("fedmq_rounds", "Round rows by state", labels=["state"]),
            GaugeMetricFamily("fedmq_devices", "Registered devices by state", labels=["state"]),
            GaugeMetricFamily("fedmq_outbox_pending", "Outbox items not yet sent"),
            GaugeMetricFamily("fedmq_update_inbox_pending", "Stored updates not yet counted"),
        ]
