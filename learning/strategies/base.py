"""The strategy contract: how a round's client updates become the next global model.

A strategy works in two steps, both on plain numpy arrays keyed by tensor name:

1. **Combine** the clients' updates into one aggregated delta Δ. Updates are always deltas
   against the round's global model (``delta_k = w_k - w``). ``accumulator(k)`` returns an
   object whose ``add(tensors, weight)`` takes one update at a time (``weight`` = its sample
   count n_k) and whose ``result()`` gives Δ. Linear strategies (``streaming = True``) fold
   ``Δ = Σ n_k/n · Δ_k`` into a float64 running sum: memory O(model), not O(clients x model).
   Robust strategies (``streaming = False``) must see every update at once; they say how
   much memory that takes (``memory_bytes``) and ``check_memory`` refuses beyond a cap.
2. **Step** the server: ``step(weights, delta, state) -> (new_weights, new_state)``.
   FedAvg is ``w + Δ``; server optimisers treat ``g = -Δ`` as a pseudo-gradient.
   ``state`` (momentum, moments) is a flat dict of arrays named ``"<slot>/<tensor>"``; the
   caller persists it between rounds and passes back what the previous round returned
   (empty on the first round).

Only float tensors go through a strategy (the caller keeps integer counters apart).
Every strategy also takes ``clip_norm``: each update's delta is scaled to at most that
global L2 norm before it is combined (see ``clip.py``), whatever the strategy.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import numpy as np

from learning.strategies.aggregate import StackedUpdates, WeightedMean
from learning.strategies.clip import clip_by_norm

Weights = dict[str, np.ndarray]
State = dict[str, np.ndarray]

GiB = 1 << 30


class StrategyError(ValueError):
    """A strategy cannot be built or cannot aggregate; the message says what to change."""


class MemoryCapExceeded(StrategyError):
    """A non-streaming strategy would need more memory than the configured cap."""


class Accumulator(Protocol):
    """Takes updates one at a time; ``result()`` is the aggregated delta."""

    @property
    def count(self) -> int: ...

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None: ...

    def result(self) -> Weights: ...


class Strategy(ABC):
    """Base of every strategy. Subclasses set ``name`` and override what differs."""

    name: ClassVar[str]
    streaming: ClassVar[bool] = True
    # Names of the per-tensor server state arrays (e.g. ("m", "v") for FedAdam).
    state_slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, clip_norm: float | None = None) -> None:
        if clip_norm is not None and not (float(clip_norm) > 0 and np.isfinite(clip_norm)):
            raise StrategyError(f"{self.name}: clip_norm must be a positive number or None")
        self.clip_norm = None if clip_norm is None else float(clip_norm)

    # --- description ---------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """The parameters this strategy was built with (JSON-able), clip_norm included."""
        return {"clip_norm": self.clip_norm}

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **params}``: what a run's config holds, and what is recorded."""
        return {"name": self.name, **self.params()}

    def client_config(self) -> dict[str, Any]:
        """Settings the clients' local trainer needs (FedProx's mu); none by default."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    # --- combining -------------------------------------------------------------------------

    def memory_bytes(self, num_updates: int, model_bytes: int) -> int:
        """Working memory to combine ``num_updates`` updates of a model of ``model_bytes``
        (fp32) bytes, beyond the global model and the one update being decoded.

        Streaming: a float64 running sum (2 x model), whatever the number of updates.
        """
        return 2 * model_bytes

    def check_memory(self, num_updates: int, model_bytes: int, cap_bytes: int) -> None:
        """Raise MemoryCapExceeded when ``memory_bytes`` is over ``cap_bytes``."""
        need = self.memory_bytes(num_updates, model_bytes)
        if need > cap_bytes:
            raise MemoryCapExceeded(
                f"{self.name} needs {need / GiB:.2f} GiB to combine {num_updates} updates of "
                f"{model_bytes / 2**20:.1f} MiB each (it holds every update at once), over "
                f"the cap of {cap_bytes / GiB:.2f} GiB; use a streaming strategy (fedavg, "
                "fedprox, fedavgm, fedadam, fedyogi, fedadagrad), select fewer clients per "
                "round, or raise the cap (max_aggregation_bytes)"
            )

    def accumulator(self, num_updates: int) -> Accumulator:
        """A fresh accumulator for one round of ``num_updates`` updates."""
        if self.streaming:
            return WeightedMean()
        return StackedUpdates(num_updates, self.reduce)

    def reduce(self, stacks: Mapping[str, np.ndarray], weights: np.ndarray) -> Weights:
        """Non-streaming strategies: combine stacked updates (axis 0 = clients)."""
        raise NotImplementedError(f"{self.name} is streaming: it folds, it does not reduce")

    def prepare(self, delta: Weights) -> tuple[Weights, float]:
        """Clip one update before it is combined; returns it (scaled in place) and its norm."""
        return clip_by_norm(delta, self.clip_norm, inplace=True)

    # --- the server step -------------------------------------------------------------------

    def step(
        self, weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], state: State
    ) -> tuple[Weights, State]:
        """New global weights (float32) and server state from the aggregated delta."""
        if delta.keys() != weights.keys():
            raise StrategyError(f"{self.name}: the aggregated delta has different tensors")
        new_w: Weights = {}
        new_state: State = {}
        for name, w in weights.items():
            d = np.asarray(delta[name], dtype=np.float64)
            if d.shape != w.shape:
                raise StrategyError(f"{self.name}: delta {name!r} is {d.shape}, not {w.shape}")
            slots = {s: _slot(state, s, name, w.shape, self.name) for s in self.state_slots}
            w64, stepped = self.step_tensor(w.astype(np.float64), d, slots)
            new_w[name] = w64.astype(np.float32)
            for slot, arr in stepped.items():
                new_state[f"{slot}/{name}"] = arr.astype(np.float32)
        return new_w, new_state

    def step_tensor(
        self, w: np.ndarray, delta: np.ndarray, slots: dict[str, np.ndarray | None]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One tensor's step, in float64; ``slots`` hold None on the first round."""
        return w + delta, {}


def _slot(
    state: State, slot: str, name: str, shape: tuple[int, ...], who: str
) -> np.ndarray | None:
    arr = state.get(f"{slot}/{name}")
    if arr is None:
        return None
    if arr.shape != shape:
        raise StrategyError(f"{who}: server state {slot}/{name} is {arr.shape}, not {shape}")
    return np.asarray(arr, dtype=np.float64)
