"""Unmasking on the worker: the survivors' masked blobs and the round's SecAgg material →
the weighted mean delta, and never one device's update.

The masked blobs decode through the codec against the one tensor they may hold (a uint32
vector of the model's float size); ``protocol.secagg.unmask_sum`` removes the masks from
their ring sum; the sum is dequantised with the round's scale and the survivors' summed
sample counts (counts are public). Central DP would compose here (README, "Secure
aggregation"): devices clip before masking, the worker adds the noise to this mean after
unmasking; that wiring is not built yet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from protocol import codec
from protocol.codec import TensorSpec
from protocol.secagg import SecAggError, dequantize_mean, unflatten, unmask_sum
from protocol.secagg.ring import Layout

MASKED = "secagg.masked"


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
