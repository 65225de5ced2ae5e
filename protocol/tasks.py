"""The Celery task contract between the orchestrator and the workers.

The orchestrator sends these by name (it never imports ``workers``); the workers register
them under the same names. Arguments are JSON only.

- ``fedmq.aggregate(run_id: str, round_number: int, attempt: int) -> dict`` on ``aggregate``:
  folds the round's stored updates into a new model version (idempotent per round); returns
  ``{"model_version", "blob_sha256", "num_updates", "num_samples", "created"}``.
  A round of many updates whose strategy is a weighted mean may be folded in parts: in a
  worker the task then replaces itself with the two tasks below (a Celery chord), and the
  task id the orchestrator follows ends with the combine's result, the same dict (eagerly
  the parts run in the task itself).
- ``fedmq.aggregate.partial(run_id, round_number, attempt, part: int, parts: int,
  digest: str) -> dict`` on ``aggregate``: folds part ``part`` of ``parts`` of the round's
  updates into a stored float64 partial-sum blob; ``digest`` names the round's base model
  and updates. Sent by the workers only, never by the orchestrator.
- ``fedmq.aggregate.combine(partials: list[dict], run_id, round_number, attempt,
  parts: int, digest: str, began: float) -> dict`` on ``aggregate``: adds the partial sums
  and stores the round's model version; returns what ``fedmq.aggregate`` returns.
- ``fedmq.evaluate(run_id: str, round_number: int, model_version: int) -> dict`` on
  ``evaluate``: ``{"model_version", "loss", "accuracy", "num_samples"}`` or ``{"skipped"}``.
"""

from __future__ import annotations

AGGREGATE_TASK = "fedmq.aggregate"
AGGREGATE_PARTIAL_TASK = "fedmq.aggregate.partial"
AGGREGATE_COMBINE_TASK = "fedmq.aggregate.combine"
EVALUATE_TASK = "fedmq.evaluate"
AGGREGATE_QUEUE = "aggregate"
EVALUATE_QUEUE = "evaluate"
EDGE_QUEUE = "edge"
EDGE_TASK_PATTERN = "fedmq.edge.*"
# ``fedmq.edge.session(spec: dict) -> dict`` on ``edge``: serves one split-training session
# (``protocol.split``) until it ends; the spec and result are in ``workers/edge/task.py``.
# The orchestrator sends one per round attempt of a split run, with ``run_id``, ``round``,
# ``attempt``, ``session_id`` (``round_session_id``), ``model``, ``train`` and ``edge``;
# a second delivery of the same attempt's session answers ``{"skipped": reason}``.
EDGE_SESSION_TASK = "fedmq.edge.session"
