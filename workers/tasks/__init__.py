"""The task bodies: plain functions taking a WorkerConfig, wired to Celery in workers.app."""

from workers.tasks.aggregate import aggregate_round
from workers.tasks.common import AggregationError, EvaluationError, TaskError
from workers.tasks.evaluate import evaluate_version

__all__ = [
    "AggregationError",
    "EvaluationError",
    "TaskError",
    "aggregate_round",
    "evaluate_version",
]
