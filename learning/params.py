"""Model weights as plain numpy: ``state_dict`` <-> ``dict[str, np.ndarray]``, and deltas.

Floating tensors become float32 copies (what the codec takes); integer buffers (BatchNorm's
``num_batches_tracked``) keep their dtype. Deltas are taken on float tensors only: integer
tensors are counters, not weights, and travel as values (the worker's fold does the same).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

Arrays = dict[str, np.ndarray]


def is_float(a: np.ndarray) -> bool:
    return bool(np.issubdtype(a.dtype, np.floating))


def to_numpy(model: nn.Module) -> Arrays:
    """The model's state dict as numpy copies: floats as float32, others as they are."""
    out: Arrays = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        out[name] = t.float().numpy().copy() if t.is_floating_point() else t.numpy().copy()
    return out


def load_numpy(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load ``arrays`` into ``model`` (strict: the same names and shapes), casting dtypes."""
    own = model.state_dict()
    missing, extra = set(own) - set(arrays), set(arrays) - set(own)
    if missing or extra:
        raise KeyError(f"state mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}")
    state = {}
    for name, ref in own.items():
        value = torch.from_numpy(np.array(arrays[name], order="C"))  # a writable copy
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        state[name] = value.to(dtype=ref.dtype)
    model.load_state_dict(state)


def delta(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]) -> Arrays:
    """``new - old`` for float tensors (float32); other tensors are ``new``'s values."""
    return {
        name: (np.asarray(v, np.float32) - np.asarray(old[name], np.float32))
        if is_float(np.asarray(v))
        else np.array(v, copy=True)
        for name, v in new.items()
    }


def apply_delta(base: Mapping[str, np.ndarray], d: Mapping[str, np.ndarray]) -> Arrays:
    """The inverse of ``delta``: ``base + d`` for floats, ``d``'s values for the others."""
    return {
        name: (np.asarray(b, np.float32) + np.asarray(d[name], np.float32))
        if is_float(np.asarray(b))
        else np.array(d.get(name, b), copy=True)
        for name, b in base.items()
    }
