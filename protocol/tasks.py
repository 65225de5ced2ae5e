"""The Celery task contract between the orchestrator and the workers.

The orchestrator sends these by name (it never imports ``workers``); the workers register
them under the same names. Arguments are JSON only.

- ``fedmq.aggregate(run_id: str, round_number: int, attempt: int) -> dict`` on ``aggregate``:
  folds the round's stored updates into a new model version (idempotent per round); returns
  ``{"model_version", "blob_sha256", "num_updates", "num_samples", "created"}``.
- ``fedmq.evaluate(run_id: str, round_number: int, model_version: int) -> dict`` on
  ``evaluate``: ``{"model_version", "loss", "accuracy", "num_samples"}`` or ``{"skipped"}``.
"""

from __future__ import annotations

AGGREGATE_TASK = "fedmq.aggregate"
EVALUATE_TASK = "fedmq.evaluate"
AGGREGATE_QUEUE = "aggregate"
EVALUATE_QUEUE = "evaluate"
EDGE_QUEUE = "edge"
EDGE_TASK_PATTERN = "fedmq.edge.*"
# ``fedmq.edge.session(spec: dict) -> dict`` on ``edge``: serves one split-training session
# (``protocol.split``) until it ends; the spec and result are in ``workers/edge/task.py``.
EDGE_SESSION_TASK = "fedmq.edge.session"
