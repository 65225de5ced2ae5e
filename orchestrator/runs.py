"""Creating a run for the orchestrator: the run row, model version 0 and the first snapshot."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from sqlalchemy.orm import Session

from db import blobstore
from db import queries as q
from db.models import BlobKind
from db.queries import orchestrator as oq
from orchestrator.edge import is_split
from orchestrator.state import Federation, RoundPolicy, to_dict
from orchestrator.state.secagg import RunSecAgg
from protocol.codec import DecodeLimits, decode
from protocol.secagg import SecAggError


def create_run(
    s: Session,
    name: str,
    initial_model: bytes,
    *,
    policy: RoundPolicy | None = None,
    strategy: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    run_id: str | None = None,
    extra_config: dict[str, Any] | None = None,
    limits: DecodeLimits | None = None,
    split: dict[str, Any] | None = None,
    secagg: dict[str, Any] | None = None,
) -> str:
    """Create a run whose global model version 0 is ``initial_model`` (a full-values codec
    blob; the orchestrator cannot build models, the caller does). Returns the run id.

    ``runs.config`` keeps ``policy`` (also in the snapshot), ``strategy`` (read by the
    aggregate task) and ``train`` (sent to devices in every round announcement).

    ``split`` makes it a split run (``{"model": <model spec>, "edge": <edge settings>}``,
    ``orchestrator.edge``): ``initial_model`` is then the devices' part (head and tail), and
    every round attempt starts an edge session for the body.

    ``secagg`` makes it a secure run (``{"degree", "threshold", "clip", "stage_s"}``, each
    optional; ``orchestrator.state.secagg.RunSecAgg``): every round runs the SecAgg+
    stages, and ``train["secagg"]`` tells devices so in every announcement.
    """
    decoded = decode(initial_model, limits=limits or DecodeLimits())
    if decoded.delta:
        raise ValueError("the initial model must hold full values, not a delta")
    policy = policy or RoundPolicy()
    config: dict[str, Any] = {
        **(extra_config or {}),
        "policy": asdict(policy),
        "strategy": strategy or {"name": "fedavg"},
        "train": train or {},
    }
    secure = None
    if secagg is not None:
        if split is not None:
            raise ValueError("a split run cannot be secure: the edge sees activations anyway")
        if policy.mode == "async":
            raise ValueError("an async run cannot be secure: SecAgg+ sums a round's updates")
        try:
            secure = RunSecAgg.from_dict(secagg).to_dict()
        except SecAggError as e:
            raise ValueError(f"secagg: {e}") from None
        config["secagg"] = secure
        config["train"] = {**config["train"], "secagg": True, **_central_dp(config)}
    if split is not None:
        config["split"] = split
        if not is_split(config):
            raise ValueError("a split run needs split.model: the model spec the edge builds")
    run = q.create_run(s, name, config, run_id=run_id)
    sha = blobstore.put(s, initial_model, BlobKind.MODEL)
    q.create_model_version(s, run.id, sha)
    fed = Federation(run_id=run.id, policy=policy, split=split is not None, secagg=secure)
    oq.save_machine(s, run.id, to_dict(fed))
    return run.id


def _central_dp(config: dict[str, Any]) -> dict[str, Any]:
    """What devices of a secure run with central DP do before masking (the worker cannot
    clip an update it never sees): clip the delta's L2 norm to the run's clip norm, and
    weigh 1 (DP-FedAvg's uniform average, so one device moves the mean by at most C/m).
    The noise is the worker's, once, after unmasking (docs/architecture.md)."""
    privacy = config.get("privacy")
    if not isinstance(privacy, dict) or privacy.get("mode") != "central":
        return {}
    if privacy.get("adaptive"):
        raise ValueError(
            "secure aggregation with adaptive clipping is not supported: it needs each "
            "update's clipped bit in the clear"
        )
    return {"secagg_l2_clip": float(privacy["clip_norm"]), "secagg_unit_weight": True}
