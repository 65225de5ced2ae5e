"""The edge session of a split run's round attempt, as the outbox sends it.

A split run (``runs.config["split"]``: ``{"model": <model spec>, "edge": <edge settings>}``)
trains the body of its model on an edge worker, one ``fedmq.edge.session`` task per round
attempt (``workers/edge/task.py``). The machine says when (``DispatchEdgeSession``, with the
attempt's announcement); this module writes what: the whole spec goes into the outbox row,
so that a re-drained row sends the same task, under the same task id, with the same session
id, and the task itself refuses a second start of one session (idempotent by session id).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.state import DispatchEdgeSession
from protocol.split import round_session_id
from protocol.tasks import EDGE_QUEUE, EDGE_SESSION_TASK

# The train settings the edge's optimiser takes from the run's train config.
EDGE_TRAIN_KEYS = ("lr", "momentum", "weight_decay")
# After the attempt's deadline, how long the session waits for the round's model version
# to name its body in (aggregation runs after the round closes).
VERSION_WAIT_AFTER_DEADLINE_S = 600.0


def edge_task_id(run_id: str, number: int, attempt: int) -> str:
    return f"edge-{run_id}-{number}-{attempt}"


def is_split(run_config: Mapping[str, Any] | None) -> bool:
    """Whether a run's config describes a split run (its model spec under ``split``)."""
    split = (run_config or {}).get("split")
    return isinstance(split, Mapping) and isinstance(split.get("model"), Mapping)


def session_spec(
    run_id: str, run_config: Mapping[str, Any], e: DispatchEdgeSession, now: float
) -> dict[str, Any]:
    """The ``fedmq.edge.session`` spec of ``e``'s attempt. Raises ValueError for a run whose
    config is not a split run's."""
    if not is_split(run_config):
        raise ValueError(f"run {run_id} is split but its config has no split model")
    split = run_config["split"]
    train = run_config.get("train") or {}
    left = max(1.0, e.deadline - now)
    edge = {
        # Until the deadline a selected device may still come; the session also ends when
        # the attempt does (workers/edge/task.py watches the round).
        "idle_timeout_s": left,
        **dict(split.get("edge") or {}),
        "expected_devices": max(1, len(e.devices)),
    }
    return {
        "run_id": run_id,
        "round": e.round,
        "attempt": e.attempt,
        "session_id": round_session_id(run_id, e.round, e.attempt),
        "model": dict(split["model"]),
        "train": {k: train[k] for k in EDGE_TRAIN_KEYS if k in train},
        "edge": edge,
        "version_wait_s": left + VERSION_WAIT_AFTER_DEADLINE_S,
    }


def outbox_item(
    run_id: str, run_config: Mapping[str, Any], e: DispatchEdgeSession, now: float
) -> dict[str, Any]:
    """The outbox payload of a ``task`` row that starts ``e``'s session."""
    return {
        "name": EDGE_SESSION_TASK,
        "args": [session_spec(run_id, run_config, e, now)],
        "task_id": edge_task_id(run_id, e.round, e.attempt),
        "queue": EDGE_QUEUE,
    }
