"""The Celery app and its tasks, ``fedmq.aggregate`` (with its parts,
``fedmq.aggregate.partial`` and ``fedmq.aggregate.combine``) and ``fedmq.evaluate``.

``celery -A workers.app worker -Q aggregate`` runs a worker configured from ``FEDMQ_*``
variables (``WorkerConfig.from_env``); the composition root calls ``configure(config)``
with a config built from its settings instead. The task bodies live in ``workers.tasks``
as plain functions; this module only wires them to Celery.

Delivery: both tasks are idempotent, so they ack late (``task_acks_late``) and a task
whose worker dies is requeued (``task_reject_on_worker_lost``) and redone by another
worker; ``worker_prefetch_multiplier=1`` keeps one unacked task per process so a dead
worker strands at most one. Database errors (OperationalError, InterfaceError) are
retried with exponential backoff and jitter; ``TaskError`` (bad config, no usable
update, a stale attempt) is final. Messages are JSON only: a broker message is never
unpickled (Celery's pickle would run code from whoever can publish to the broker).

Embedded mode (broker ``memory://``): tasks run eagerly in the caller's process.
Note that Celery's ``send_task`` always publishes, even when eager; in-process callers
should use ``app.signature(name, args=...).apply_async()``, which runs a registered task
eagerly and falls back to publishing by name when the task is not registered.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Signature, Task, chord, group
from sqlalchemy.exc import InterfaceError, OperationalError

from protocol.tasks import (
    AGGREGATE_COMBINE_TASK,
    AGGREGATE_PARTIAL_TASK,
    AGGREGATE_QUEUE,
    AGGREGATE_TASK,
    EDGE_QUEUE,
    EDGE_SESSION_TASK,
    EDGE_TASK_PATTERN,
    EVALUATE_QUEUE,
    EVALUATE_TASK,
)
from workers import metrics
from workers.config import WorkerConfig
from workers.health import BrokerHealth
from workers.tasks.aggregate import SplitJob, aggregate_round
from workers.tasks.evaluate import evaluate_version
from workers.tasks.split import combine_round, fold_parts_here, partial_round

# ``workers.edge.task`` (and with it the split models) is imported by the edge task itself,
# so that aggregate/evaluate workers do not load it.

TASK_ROUTES: dict[str, dict[str, str]] = {
    AGGREGATE_TASK: {"queue": AGGREGATE_QUEUE},
    AGGREGATE_PARTIAL_TASK: {"queue": AGGREGATE_QUEUE},
    AGGREGATE_COMBINE_TASK: {"queue": AGGREGATE_QUEUE},
    EVALUATE_TASK: {"queue": EVALUATE_QUEUE},
    EDGE_TASK_PATTERN: {"queue": EDGE_QUEUE},
}
# Transient: the database went away or a connection broke. Retried with backoff.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError)
RETRY_BACKOFF_S = 2
RETRY_BACKOFF_MAX_S = 60


def celery_config(config: WorkerConfig) -> dict[str, Any]:
    """Celery settings for ``config``; a client that only sends tasks uses the same."""
    return {
        "broker_url": config.broker_url,
        "result_backend": config.result_backend_url,
        "task_routes": TASK_ROUTES,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_track_started": True,
        "task_time_limit": config.task_time_limit_s,
        "task_soft_time_limit": 0.9 * config.task_time_limit_s,
        "task_always_eager": config.eager,
        "task_eager_propagates": True,
        "task_publish_retry": True,
        # A worker outlives any broker outage (issue 17: one died in a few minutes): it
        # reconnects for ever, at start too, and channel errors count as connection errors.
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_channel_error_retry": True,
        "broker_transport_options": {"confirm_publish": True},
        "database_short_lived_sessions": True,
        "result_expires": 24 * 3600,
    }


def create_app(config: WorkerConfig, name: str = "fedmq") -> Celery:
    """A bare app with fedmq's settings (no tasks): for clients that send by name."""
    client = Celery(name, set_as_current=False)
    client.conf.update(celery_config(config))
    return client


app = Celery("fedmq", set_as_current=False)
app.steps["consumer"].add(BrokerHealth)  # the worker's row in service_health
_config: WorkerConfig = WorkerConfig()


def configure(config: WorkerConfig) -> Celery:
    """Apply ``config`` to this module's app (and so to its tasks); returns the app."""
    global _config
    _config = config
    app.conf.update(celery_config(config))
    for task in (aggregate, aggregate_partial, aggregate_combine, evaluate):
        task.max_retries = config.max_retries
    metrics.install(config)
    return app


def current_config() -> WorkerConfig:
    return _config


_RETRY: dict[str, Any] = {
    "autoretry_for": TRANSIENT_ERRORS,
    "retry_backoff": RETRY_BACKOFF_S,
    "retry_backoff_max": RETRY_BACKOFF_MAX_S,
    "retry_jitter": True,
    "max_retries": 3,
}


@app.task(name=AGGREGATE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, **_RETRY)
def aggregate(
    self: Task, run_id: str, round_number: int, attempt: int, secagg: str | None = None
) -> dict[str, Any]:
    """Aggregate a round into a new model version; see workers.tasks.aggregate.
    ``secagg``: a secure round's unmasking material (the sha256 of its blob).

    A round split into parts replaces this task with a chord (its partial tasks, then the
    combine) that inherits this task's id, so whoever follows the id gets the combine's
    result; the task ends there instead of holding a worker process while the parts run
    (with one prefetched task per process, a waiting task could starve its own parts).

    Eagerly (embedded mode) the parts run here, one after the other, and the task returns
    the combine's result: one process gains nothing from a chord, and Celery refuses the
    join an eager chord needs inside a task sent with ``apply_async`` (the embedded
    orchestrator's way), raising "Never call result.get() within a task".
    """

    def fan_out(job: SplitJob) -> dict[str, Any]:
        if self.request.is_eager:
            return fold_parts_here(_config, job)
        result: dict[str, Any] = self.replace(split_signature(job))
        return result

    return aggregate_round(
        _config,
        run_id,
        round_number,
        attempt,
        task_id=self.request.id,
        fan_out=fan_out,
        secagg=secagg,
    )


def split_signature(job: SplitJob) -> Signature:
    """The chord that folds ``job``'s parts in parallel, then combines them.

    Chord bookkeeping with the database result backend is Celery's ``chord_unlock``
    task, polling the parts' states once a second; it goes to the body's queue, so the
    aggregate workers run it. ``si``: the parts take no result from anything before them.
    """
    header = group(
        aggregate_partial.si(*job.partial_args(p)).set(queue=AGGREGATE_QUEUE)
        for p in range(job.parts)
    )
    body = aggregate_combine.s(*job.combine_args()).set(queue=AGGREGATE_QUEUE)
    return chord(header, body)


@app.task(
    name=AGGREGATE_PARTIAL_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, **_RETRY
)
def aggregate_partial(
    self: Task, run_id: str, round_number: int, attempt: int, part: int, parts: int, digest: str
) -> dict[str, Any]:
    """Fold one part of a split round into a stored partial sum; see workers.tasks.split."""
    return partial_round(
        _config, run_id, round_number, attempt, part, parts, digest, task_id=self.request.id
    )


@app.task(
    name=AGGREGATE_COMBINE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, **_RETRY
)
def aggregate_combine(
    self: Task,
    partials: list[dict[str, Any]],
    run_id: str,
    round_number: int,
    attempt: int,
    parts: int,
    digest: str,
    began: float,
) -> dict[str, Any]:
    """Add a split round's partial sums into its model version; see workers.tasks.split."""
    return combine_round(
        _config,
        partials,
        run_id,
        round_number,
        attempt,
        parts,
        digest,
        began,
        task_id=self.request.id,
    )


@app.task(name=EVALUATE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, **_RETRY)
def evaluate(self: Task, run_id: str, round_number: int, model_version: int) -> dict[str, Any]:
    """Evaluate a model version on the run's test set; see workers.tasks.evaluate."""
    return evaluate_version(_config, run_id, round_number, model_version)


# Acked early and never retried: a session whose worker died has already failed its
# devices (their requests found no queue), and replaying it later would serve no one.
@app.task(name=EDGE_SESSION_TASK, acks_late=False, reject_on_worker_lost=False)
def edge_session(spec: dict[str, Any]) -> dict[str, Any]:
    """Serve one edge split-training session; see workers.edge.task."""
    from workers.edge.task import run_edge_session

    return run_edge_session(_config, spec)


configure(WorkerConfig.from_env())
