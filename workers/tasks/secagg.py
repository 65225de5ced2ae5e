"""Unmasking on the worker: the survivors' masked blobs and the round's SecAgg material →
the weighted mean delta, and never one device's update.

``aggregate_secure`` is ``fedmq.aggregate`` for a secure run's round: the orchestrator
closed it once the survivors' shares were in and passes the material blob's sha256; the
round's received updates must be exactly the material's survivors (a round's model is the
unmasked sum of exactly its survivors), the strategy's server step runs on the mean.

The masked blobs decode through the codec against the one tensor they may hold (a uint32
vector of the model's float size); ``protocol.secagg.unmask_sum`` removes the masks from
their ring sum; the sum is dequantised with the round's scale and the survivors' summed
sample counts (counts are public). Central DP would compose here (README, "Secure
aggregation"): devices clip before masking, the worker adds the noise to this mean after
unmasking; central DP's noise is added to this mean in ``aggregate_secure``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db.engine import session_scope
from protocol import codec
from protocol.codec import TensorSpec
from protocol.secagg import SecAggError, dequantize_mean, layout_of, unflatten, unmask_sum
from protocol.secagg.blob import MASKED
from protocol.secagg.ring import Layout
from workers.config import WorkerConfig
from workers.fold import folds_linearly
from workers.tasks.common import AggregationError, blob_loader
from workers.tasks.plan import Folded, Plan, store_version
from workers.tasks.privacy import PRIVACY_KEY, release


def unmask_mean(
    material: Mapping[str, Any], load: Callable[[str], bytes], layout: Layout
) -> tuple[dict[str, np.ndarray], int]:
    """(weighted mean delta by tensor, total samples) of the round's survivors."""
    size = sum(int(np.prod(shape, dtype=np.int64)) for _, shape in layout)
    expected = {MASKED: TensorSpec((size,), "uint32")}
    masked: dict[str, np.ndarray] = {}
    for cid, ref in material["masked"].items():
        try:
            masked[cid] = codec.decode(load(ref), expected=expected).tensors[MASKED]
        except codec.CodecError as e:
            raise SecAggError(f"masked input of {cid}: {e}") from None
    keys = material["keys"]
    roster = {c: (bytes.fromhex(k[0]), bytes.fromhex(k[1])) for c, k in keys.items()}
    revealed = {
        rep: {o: (ks[0], bytes.fromhex(ks[1])) for o, ks in shares.items()}
        for rep, shares in material["revealed"].items()
    }
    total = unmask_sum(
        masked,
        roster,
        material["sharers"],
        revealed,
        graph_seed=bytes.fromhex(material["graph_seed"]),
        degree=int(material["degree"]),
        threshold=int(material["threshold"]),
        context=str(material["context"]).encode(),
    )
    samples = sum(int(keys[c][2]) for c in masked)
    mean = dequantize_mean(total, samples, int(material["scale"]))
    return unflatten(mean, layout), samples


def fedavg_step(
    base: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray], server_lr: float = 1.0
) -> dict[str, np.ndarray]:
    """FedAvg's server step on the unmasked mean; tensors without a delta stay as they are."""
    out = {n: np.asarray(v).copy() for n, v in base.items()}
    for n, d in mean_delta.items():
        out[n] = (np.asarray(base[n], dtype=np.float32) + server_lr * d).astype(np.float32)
    return out


def aggregate_secure(
    config: WorkerConfig,
    factory: sessionmaker[Session],
    plan: Plan,
    run_id: str,
    round_number: int,
    attempt: int,
    material_sha: str | None,
    began: float,
) -> dict[str, Any]:
    """A secure round's model version: the survivors' weighted mean, unmasked here."""
    if material_sha is None:
        raise AggregationError(
            f"round {round_number} of a secure run came without its unmasking material"
        )
    if not folds_linearly(plan.strategy):
        raise AggregationError(
            f"run config: secure aggregation sums updates; {plan.strategy.name} needs each"
        )
    with session_scope(factory) as s:
        material = json.loads(blobstore.get(s, material_sha))
    survivors = dict(material["masked"])
    received = {u.client_id: u.blob_sha for u in plan.updates}
    if received != survivors:
        raise AggregationError(
            f"round {round_number}: its received updates {sorted(received)} are not the "
            f"survivors the shares unmask {sorted(survivors)}"
        )
    started = time.perf_counter()
    try:
        mean, samples = unmask_mean(
            material, blob_loader(factory, list(survivors.values())), layout_of(plan.base.floats)
        )
    except SecAggError as e:
        raise AggregationError(f"unmasking round {round_number}: {e}") from None
    sharers = list(material["sharers"])
    how: dict[str, Any] = {
        "fold": "secagg",
        "secagg": {
            "material": material_sha,  # what it was unmasked with: the round's audit trail
            "survivors": len(survivors),
            "dropped": len(sharers) - len(survivors),
            "advertised": len(material["keys"]),
            "degree": int(material["degree"]),
            "threshold": int(material["threshold"]),
            "scale": int(material["scale"]),
            "clip": float(material["clip"]),
            "unmask_s": round(time.perf_counter() - started, 3),
        },
    }
    delta = {n: v.astype(np.float64) for n, v in mean.items()}
    if plan.privacy is not None:
        # Central DP: the devices clipped to C and weighed 1, so this is the mean of m
        # clipped updates; N(0, (z·C/m)²) is added once, here, before the server step.
        if plan.privacy.config.adaptive:
            raise AggregationError("run config: adaptive clipping cannot be secure")
        heavy = sorted(c for c in survivors if int(material["keys"][c][2]) != 1)
        if plan.privacy.central and heavy:
            # Weights are public: one above 1 would let its device move the mean further.
            raise AggregationError(f"central DP needs unit weights; {heavy} announced more")
        how[PRIVACY_KEY] = release(plan.privacy, delta, len(survivors), 0, run_id, round_number)
    folded = Folded(
        delta=delta,
        counters=dict(plan.base.others),
        num_updates=len(survivors),
        num_samples=samples,
        clipped=0,
        skipped={},
        fold_device="cpu",
        metrics=how,
    )
    return store_version(
        config,
        factory,
        plan,
        folded,
        run_id,
        round_number,
        attempt,
        load=blob_loader(factory),
        began=began,
    )
