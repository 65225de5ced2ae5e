"""Streaming aggregation: read, decode and fold the round's updates one at a time.

``iter_deltas`` turns stored update blobs into checked float32 deltas against the round's
global model, one at a time (decode → to delta → clip); ``fold_updates`` feeds them to a
folder (an ``Accumulator``: ``add(tensors, weight)`` then ``result()``). Only one update
is alive at a time, so a streaming strategy needs the global model, one update and its
float64 sum: O(model), not O(clients x model).

The folder is where the device pipeline (``workers.pipeline``) slots in: ``make_folder``
returns the strategy's CPU accumulator, or for the weighted-mean strategies on a GPU a
``TorchFolder`` (pinned double-buffered staging, copies on a side CUDA stream) taking the
same ``add`` calls; ``fold_updates(..., decode_ahead=2)`` runs ``iter_deltas`` in a thread
two updates ahead of the fold, so decoding update k+1 overlaps folding update k.
``fold_partial`` folds one part of a round into an undivided float64 sum (hierarchical
aggregation, ``workers.tasks.split``).

Non-float tensors (counters such as BatchNorm's ``num_batches_tracked``) are not
averaged: they travel as values, not differences, and the new model takes their
element-wise maximum over the folded updates (the base model's when none carries one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np

from db.blobstore import BlobError
from learning.strategies import Accumulator, PartialSum, Strategy, StrategyError, WeightedMean
from protocol.codec import CodecError, DecodeLimits, TensorSpec, decode, spec_of
from workers.pipeline.device import resolve_device
from workers.pipeline.folder import TorchFolder
from workers.pipeline.readahead import read_ahead

log = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class UpdateRef:
    """One received update: whose, where its blob is, how many samples it was trained on."""

    client_id: str
    blob_sha: str | None
    num_samples: int | None


@dataclass(frozen=True)
class GlobalModel:
    """The round's base model, split into float weights and other (counter) tensors.

    ``names`` are the codec ``base_version`` strings a delta may name: the version number
    as a string (the convention for devices) or the model blob's SHA-256.
    """

    floats: Weights
    others: Weights
    names: frozenset[str]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray], *names: str) -> GlobalModel:
        floats, others = split_floats(tensors)
        return cls(floats, others, frozenset(names))

    @property
    def spec(self) -> dict[str, TensorSpec]:
        return spec_of({**self.floats, **self.others})

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.floats.values())


@dataclass(frozen=True)
class PreparedUpdate:
    client_id: str
    delta: Weights  # float32, clipped
    weight: float
    counters: Weights
    norm: float  # before clipping; NaN when clipping is off


@dataclass
class FoldResult:
    delta: Weights  # the combined delta (float64 for streaming strategies)
    counters: Weights
    folded: list[str] = field(default_factory=list)
    num_samples: int = 0
    clipped: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def split_floats(tensors: Mapping[str, np.ndarray]) -> tuple[Weights, Weights]:
    floats = {k: v for k, v in tensors.items() if v.dtype.kind == "f"}
    others = {k: v for k, v in tensors.items() if v.dtype.kind != "f"}
    return floats, others


def folds_linearly(strategy: Strategy) -> bool:
    """True for the weighted-mean strategies (streaming, with the base accumulator): the
    ones a ``TorchFolder`` can fold."""
    return strategy.streaming and type(strategy).accumulator is Strategy.accumulator


def split_refusal(strategy: Strategy) -> str | None:
    """Why ``strategy`` cannot be folded in parts (hierarchical aggregation), or None.

    Only a weighted mean is a sum that splits: the robust strategies take a per-coordinate
    median or trimmed mean over every update at once, which no partial result of a subset
    determines."""
    if folds_linearly(strategy):
        return None
    if not strategy.streaming:
        return (
            f"{strategy.name} takes a coordinate-wise statistic over every update at once; "
            "partial results of subsets do not determine it"
        )
    return f"{strategy.name} has its own accumulator, not a weighted mean"


def make_folder(strategy: Strategy, num_updates: int, device: str = "cpu") -> Accumulator:
    """The accumulator for one round on ``device`` (cpu, cuda, cuda:N or auto).

    The CPU gets the strategy's own accumulator; a CUDA device a ``TorchFolder`` for the
    weighted-mean strategies. The robust ones (FedMedian, FedTrimmedAvg) sort every
    coordinate across clients and stay on the CPU whatever the device. ValueError for a
    name that is no device, DeviceUnavailable for a CUDA device this machine lacks.
    """
    where = resolve_device(device)
    if where.type == "cpu":
        return strategy.accumulator(num_updates)
    if not folds_linearly(strategy):
        log.info("%s combines on the CPU (it is not a weighted mean), not on %s",
                 strategy.name, where)  # fmt: skip
        return strategy.accumulator(num_updates)
    return TorchFolder(where)


def iter_deltas(
    updates: Iterable[UpdateRef],
    load: Callable[[str], bytes],
    base: GlobalModel,
    strategy: Strategy,
    limits: DecodeLimits,
    skipped: dict[str, str],
) -> Generator[PreparedUpdate, None, None]:
    """Yield each usable update as a clipped float32 delta; record the others in
    ``skipped`` (client id -> reason). Database errors are not caught: they are transient
    and the whole task is retried."""
    spec = base.spec
    for ref in updates:
        if ref.blob_sha is None:
            skipped[ref.client_id] = "its update blob was deleted (retention)"
            continue
        if ref.num_samples is None or ref.num_samples <= 0:
            skipped[ref.client_id] = f"bad sample count {ref.num_samples!r}"
            continue
        try:
            decoded = decode(load(ref.blob_sha), limits=limits, expected=spec)
        except (CodecError, BlobError) as e:
            skipped[ref.client_id] = f"unusable update blob: {e}"
            continue
        if decoded.delta and decoded.base_version not in base.names:
            skipped[ref.client_id] = (
                f"delta against model {decoded.base_version!r}, not the round's base "
                f"({', '.join(sorted(base.names))})"
            )
            continue
        is_delta = decoded.delta
        floats, counters = split_floats(decoded.tensors)
        del decoded
        if not is_delta:  # full weights: make them a delta against the base, in place
            for name, w in floats.items():
                np.subtract(w, base.floats[name], out=w)
        delta, norm = strategy.prepare(floats)
        upd = PreparedUpdate(ref.client_id, delta, float(ref.num_samples), counters, norm)
        del floats, delta, counters
        yield upd
        del upd  # not held while the next update is decoded


def fold_updates(
    updates: Iterable[UpdateRef],
    load: Callable[[str], bytes],
    base: GlobalModel,
    strategy: Strategy,
    *,
    limits: DecodeLimits = DecodeLimits(),
    folder: Accumulator | None = None,
    after_each: Callable[[PreparedUpdate], None] | None = None,
    decode_ahead: int = 0,
) -> FoldResult:
    """Fold every usable update into ``folder`` (the strategy's CPU accumulator by
    default) and return the combined delta. Raises StrategyError when none is usable.

    ``decode_ahead`` > 0 decodes in a background thread up to that many updates ahead of
    the fold (``workers.pipeline.readahead``); the result is the same, bit for bit: the
    updates still fold one at a time, in order. ``load`` must then be callable from
    another thread.
    """
    refs = list(updates)
    folder = folder if folder is not None else make_folder(strategy, len(refs))
    result = _fold(refs, load, base, strategy, limits, folder, after_each, decode_ahead)
    if not result.folded:
        raise StrategyError(no_usable_update(result.skipped))
    result.delta = folder.result()
    for name, value in base.others.items():
        result.counters.setdefault(name, value)
    return result


def fold_partial(
    updates: Iterable[UpdateRef],
    load: Callable[[str], bytes],
    base: GlobalModel,
    strategy: Strategy,
    *,
    limits: DecodeLimits = DecodeLimits(),
    folder: WeightedMean | TorchFolder | None = None,
    after_each: Callable[[PreparedUpdate], None] | None = None,
    decode_ahead: int = 0,
) -> tuple[FoldResult, PartialSum | None]:
    """``fold_updates`` for one part of a round (hierarchical aggregation): the float64
    sums and total weight, not divided (None when no update of the part is usable, which
    is not an error here: other parts may have some), and the fold's bookkeeping.
    ``result.counters`` holds only what the folded updates carried. Only the weighted-mean
    strategies can be folded in parts (``folds_linearly``)."""
    if not folds_linearly(strategy):
        raise StrategyError(f"{strategy.name} cannot fold in parts: {split_refusal(strategy)}")
    folder = folder if folder is not None else WeightedMean()
    result = _fold(list(updates), load, base, strategy, limits, folder, after_each, decode_ahead)
    return result, folder.partial() if result.folded else None


def no_usable_update(skipped: Mapping[str, str]) -> str:
    reasons = "; ".join(f"{c}: {r}" for c, r in skipped.items()) or "no updates received"
    return f"no usable update to aggregate ({reasons})"


def _fold(
    refs: list[UpdateRef],
    load: Callable[[str], bytes],
    base: GlobalModel,
    strategy: Strategy,
    limits: DecodeLimits,
    folder: Accumulator,
    after_each: Callable[[PreparedUpdate], None] | None,
    decode_ahead: int,
) -> FoldResult:
    skipped: dict[str, str] = {}
    result = FoldResult(delta={}, counters={}, skipped=skipped)
    deltas = iter_deltas(refs, load, base, strategy, limits, skipped)
    if decode_ahead > 0:
        deltas = read_ahead(deltas, decode_ahead)
    with closing(deltas):
        _fold_all(deltas, folder, strategy, result, after_each)
    # ``skipped`` is complete here: the producer has stopped (read_ahead joins it).
    return result


def _fold_all(
    deltas: Iterator[PreparedUpdate],
    folder: Accumulator,
    strategy: Strategy,
    result: FoldResult,
    after_each: Callable[[PreparedUpdate], None] | None,
) -> None:
    counters = result.counters
    for upd in deltas:
        folder.add(upd.delta, upd.weight)
        for name, value in upd.counters.items():
            counters[name] = value if name not in counters else np.maximum(counters[name], value)
        result.folded.append(upd.client_id)
        result.num_samples += int(upd.weight)
        if strategy.clip_norm is not None and upd.norm > strategy.clip_norm:
            result.clipped += 1
        if after_each is not None:
            after_each(upd)
        del upd
