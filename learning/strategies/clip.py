"""Update-norm clipping, usable with any strategy.

Each client's delta is scaled so that its global L2 norm (over all its float tensors
together) is at most ``max_norm``: ``Δ_k ← Δ_k · min(1, max_norm / ‖Δ_k‖)``. This bounds
the influence of any one client (the clipping step of DP-FedAvg, McMahan et al. 2018,
"Learning Differentially Private Recurrent Language Models", without the noise).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Weights = dict[str, np.ndarray]


def global_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all tensors as one vector, accumulated in float64."""
    total = 0.0
    for t in tensors.values():
        flat = np.asarray(t, dtype=np.float64).reshape(-1)
        total += float(np.dot(flat, flat))
    return float(np.sqrt(total))


def clip_scale(norm: float, max_norm: float | None) -> float:
    """The factor ``min(1, max_norm / norm)``; 1 when clipping is off or not needed."""
    if max_norm is None or norm <= max_norm:
        return 1.0
    return max_norm / norm


def clip_by_norm(
    tensors: Mapping[str, np.ndarray], max_norm: float | None, *, inplace: bool = False
) -> tuple[Weights, float]:
    """Scale ``tensors`` to a global norm of at most ``max_norm``; returns them and the
    norm they had (NaN when ``max_norm`` is None: clipping is off, nothing is computed).

    ``inplace`` scales the given (float) arrays themselves, saving a copy of the update;
    otherwise new arrays are returned when scaling is needed.
    """
    if max_norm is None:
        return dict(tensors), float("nan")
    norm = global_norm(tensors)
    scale = clip_scale(norm, max_norm)
    if scale == 1.0:
        return dict(tensors), norm
    out: Weights = {}
    for name, t in tensors.items():
        if inplace:
            t *= np.asarray(scale, dtype=t.dtype)
            out[name] = t
        else:
            out[name] = (t * scale).astype(t.dtype, copy=False)
    return out, norm
