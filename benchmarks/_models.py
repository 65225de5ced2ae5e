"""The models and updates the load benchmarks send, importable by any tree's code (they use
only the codec, which has not changed its API): ``update_cpu.py`` measures old trees with
them, and ``load.py`` imports the newest wire, which older trees lack."""

from __future__ import annotations

import hashlib

import numpy as np

from protocol.codec import Encoding, encode

BIG_SHAPE = (512, 640)


def model(big: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if big:
        return {"w": rng.normal(0, 0.1, BIG_SHAPE).astype(np.float32)}
    return {
        "l1.weight": rng.normal(0, 0.1, (8, 8)).astype(np.float32),
        "l1.bias": np.zeros(8, np.float32),
        "l2.weight": rng.normal(0, 0.1, (8, 8)).astype(np.float32),
        "l2.bias": np.zeros(8, np.float32),
    }


def trained(base: dict[str, np.ndarray], cid: str) -> bytes:
    """A device's update: the model plus its own noise, as an fp32 delta against it."""
    g = np.random.default_rng(int(hashlib.sha256(cid.encode()).hexdigest()[:8], 16))
    mine = {k: v + g.normal(0, 0.01, v.shape).astype(np.float32) for k, v in base.items()}
    return encode(mine, Encoding.FP32, base=base, base_version="0")
