"""Aggregation math: free functions over plain arrays and sample counts (Flower style).

``weighted_average`` is the papers' FedAvg formula ``w = Σ n_k/n · w_k`` on whole lists;
``WeightedMean`` computes the same thing one update at a time in float64, which is what a
worker uses so that memory does not grow with the number of clients. Its unnormalised
sums (``PartialSum``: ``Σ n_k Δ_k`` and ``Σ n_k`` over some of the updates) can be taken
out and added into another ``WeightedMean``: hierarchical aggregation folds disjoint
subsets in parallel and adds their sums. ``coordinate_median``
and ``trimmed_mean`` are the robust combiners of Yin et al. 2018; ``StackedUpdates`` holds
the k updates they need in one preallocated (k, ...) array per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Weights = dict[str, np.ndarray]


def _check_counts(counts: Sequence[float]) -> np.ndarray:
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError("need at least one update")
    if not np.all(np.isfinite(n)) or np.any(n <= 0):
        raise ValueError(f"sample counts must be positive, got {list(counts)}")
    return n


def weighted_average(
    updates: Sequence[Mapping[str, np.ndarray]], counts: Sequence[float]
) -> Weights:
    """``Σ n_k/n · u_k`` per tensor, in float64 (the reference the fold is tested against)."""
    n = _check_counts(counts)
    if len(updates) != n.size:
        raise ValueError(f"{len(updates)} updates but {n.size} sample counts")
    total = n.sum()
    return {
        name: sum(
            (nk / total) * np.asarray(u[name], dtype=np.float64)
            for u, nk in zip(updates, n, strict=True)
        )
        for name in updates[0]
    }


def coordinate_median(stack: np.ndarray) -> np.ndarray:
    """Median over axis 0 (clients), coordinate-wise; sorts ``stack`` in place."""
    out: np.ndarray = np.median(stack, axis=0, overwrite_input=True)
    return out


def trimmed_mean(stack: np.ndarray, beta: float) -> np.ndarray:
    """Mean over axis 0 after dropping the ``floor(beta·k)`` smallest and largest values of
    every coordinate; sorts ``stack`` in place. Averages in float64."""
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    k = stack.shape[0]
    cut = int(np.floor(beta * k))
    stack.sort(axis=0)
    out: np.ndarray = stack[cut : k - cut].mean(axis=0, dtype=np.float64)
    return out


@dataclass
class PartialSum:
    """``Σ n_k Δ_k`` (float64, per tensor) and ``Σ n_k`` over ``count`` of a round's updates."""

    sums: Weights
    total_weight: float
    count: int


class WeightedMean:
    """Streaming ``Σ n_k Δ_k / Σ n_k``: one float64 sum per tensor, whatever k is.

    Float64 keeps the sum exact enough that the order of the updates does not matter at
    float32 precision. Products go through a small float64 scratch buffer, a slice at a
    time, so adding allocates nothing per update; ``result()`` divides the sums in place
    (the accumulator is then finished), so memory stays at 2x the fp32 model.

    Exactness of splitting (``partial`` / ``add_partial``): a float32 value times an
    integer sample count below 2**29 is exact in float64, so the only rounding is in the
    additions. Folding the updates in P contiguous runs and adding the P sums in order
    is the same sum with other brackets: per coordinate the two results differ by at most
    about ``2 (K-1) u Σ n_k |Δ_k| / Σ n_k`` (u = 2**-53; the recursive-summation bound for
    each bracketing, plus one rounding of the division), far below the float32 rounding
    of the new model. With one run (P = 1) nothing is rebracketed (``0 + S = S``) and the
    result is the same bit for bit. ``Σ n_k`` of integer counts is exact either way.
    """

    SCRATCH_ELEMENTS = 1 << 16  # 512 KiB of float64

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._scratch = np.empty(0, dtype=np.float64)
        self._total = 0.0
        self._count = 0
        self._done = False
        self._handed_over = False  # partial() took the sums

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        if self._done:
            raise ValueError("result() was already taken; start a new accumulator")
        w = float(weight)
        if not (w > 0 and np.isfinite(w)):
            raise ValueError(f"update weight must be positive, got {weight!r}")
        if not self._sums:
            self._sums = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in tensors.items()}
        elif tensors.keys() != self._sums.keys():
            raise ValueError("update has different tensors than the first one")
        if not self._scratch.size:  # the first add (add_partial needs none)
            biggest = max((s.size for s in self._sums.values()), default=0)
            self._scratch = np.empty(max(1, min(biggest, self.SCRATCH_ELEMENTS)), np.float64)
        for name, t in tensors.items():
            acc = self._sums[name]
            if np.shape(t) != acc.shape:
                raise ValueError(f"tensor {name!r} is {np.shape(t)}, expected {acc.shape}")
            flat_t, flat_acc = np.asarray(t).reshape(-1), acc.reshape(-1)
            step = self._scratch.size
            for i in range(0, flat_acc.size, step):
                part = flat_acc[i : i + step]
                tmp = self._scratch[: part.size]
                np.multiply(flat_t[i : i + step], np.float64(w), out=tmp)  # in float64
                part += tmp
        self._total += w
        self._count += 1

    def add_partial(self, part: PartialSum) -> None:
        """Add another accumulator's sums (``partial()``), as if its updates were added
        here: ``sum += part.sums`` in float64, weights and counts added."""
        if self._done:
            raise ValueError("result() was already taken; start a new accumulator")
        w = float(part.total_weight)
        if not (w > 0 and np.isfinite(w)) or part.count < 1:
            raise ValueError(f"a partial sum needs a positive weight and count, got {w!r}")
        if not self._sums:
            self._sums = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in part.sums.items()}
        elif part.sums.keys() != self._sums.keys():
            raise ValueError("partial sum has different tensors than the first one")
        for name, t in part.sums.items():
            acc = self._sums[name]
            if np.shape(t) != acc.shape or np.asarray(t).dtype != np.float64:
                raise ValueError(
                    f"partial {name!r} is {np.asarray(t).dtype}{list(np.shape(t))}, expected "
                    f"float64{list(acc.shape)}"
                )
            acc += t
        self._total += w
        self._count += part.count

    def partial(self) -> PartialSum:
        """The float64 sums and total weight, not divided; finishes the accumulator (the
        arrays are handed over, not copied)."""
        if not self._count:
            raise ValueError("no updates were added")
        if self._done:
            raise ValueError("result() was already taken; start a new accumulator")
        self._done = self._handed_over = True
        self._scratch = np.empty(0, dtype=np.float64)
        sums, self._sums = self._sums, {}
        return PartialSum(sums, self._total, self._count)

    def result(self) -> Weights:
        """The weighted mean (float64 arrays); finishes the accumulator."""
        if not self._count:
            raise ValueError("no updates were added")
        if self._handed_over:
            raise ValueError("partial() took the sums; start a new accumulator")
        if not self._done:
            for acc in self._sums.values():
                acc /= self._total
            self._done = True
            self._scratch = np.empty(0, dtype=np.float64)
        return dict(self._sums)


class StackedUpdates:
    """Holds k updates in one (k, *shape) float32 array per tensor, for robust reducers."""

    def __init__(
        self,
        num_updates: int,
        reduce: Callable[[Mapping[str, np.ndarray], np.ndarray], Weights],
    ) -> None:
        if num_updates <= 0:
            raise ValueError("need at least one update")
        self._k = num_updates
        self._reduce = reduce
        self._stacks: dict[str, np.ndarray] = {}
        self._weights = np.zeros(num_updates, dtype=np.float64)
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        if self._count >= self._k:
            raise ValueError(f"more than the {self._k} updates announced")
        if not self._stacks:
            self._stacks = {
                k: np.empty((self._k, *np.shape(v)), dtype=np.float32) for k, v in tensors.items()
            }
        elif tensors.keys() != self._stacks.keys():
            raise ValueError("update has different tensors than the first one")
        for name, t in tensors.items():
            row = self._stacks[name][self._count]
            if np.shape(t) != row.shape:
                raise ValueError(f"tensor {name!r} is {np.shape(t)}, expected {row.shape}")
            row[...] = t
        self._weights[self._count] = float(weight)
        self._count += 1

    def result(self) -> Weights:
        """Reduce the updates added (fewer than announced is fine: skipped ones)."""
        if not self._count:
            raise ValueError("no updates were added")
        stacks = {k: v[: self._count] for k, v in self._stacks.items()}
        return self._reduce(stacks, self._weights[: self._count])
