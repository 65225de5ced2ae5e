"""Creating a split run: the model spec, version 0 (the devices' head and tail) and the run.

What ``fedmq simulate --split``, ``fedmq fleet --split`` and ``fedmq run create-split``
share. The run's config says it is split (``split``: the model spec the edge, the devices
and the evaluator build, and the edge settings), and the orchestrator does the rest: an
edge session per round attempt, the evaluation of the composed model (orchestrator/edge.py).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from learning.split.spec import device_part, model_spec
from orchestrator.runs import create_run
from orchestrator.state import RoundPolicy
from protocol import codec


def create_split_run(
    s: Session,
    name: str,
    *,
    dataset: str,
    model: str,
    seed: int = 0,
    policy: RoundPolicy | None = None,
    strategy: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    edge: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> str:
    """A new split run of ``model`` on ``dataset``; returns its id."""
    spec = model_spec(dataset, model, seed)
    return create_run(
        s,
        name,
        codec.encode(device_part(spec), codec.Encoding.FP32),
        policy=policy,
        strategy=strategy,
        train=train,
        split={"model": spec, "edge": dict(edge or {})},
        extra_config={
            **(extra_config or {}),
            "model": {"name": model, **spec["config"]},
            "dataset": {"name": dataset},
        },
    )
