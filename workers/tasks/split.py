"""Hierarchical aggregation: ``fedmq.aggregate.partial`` and ``fedmq.aggregate.combine``.

``fedmq.aggregate`` splits a big round (``workers.tasks.aggregate``) into ``parts``
contiguous runs of its updates in client-id order (``workers.partials.part_bounds``).

- ``partial_round`` folds one run into a float64 ``Σ n_k Δ_k`` and ``Σ n_k``
  (``workers.fold.fold_partial``: the same decode-ahead, paged reads, clipping and
  skipping as the flat fold) and stores them as one blob (``workers.partials``), content
  addressed: a re-run stores the same bytes, so it changes nothing. It returns the blob's
  SHA-256 and its bookkeeping (updates folded and skipped). A reason a retry cannot fix
  (a stale attempt, a round whose updates changed) comes back as ``{"error"}``, not as an
  exception, so that the combine fails the round with an ``AggregationError`` in every
  mode (an exception inside a chord's header would reach the orchestrator as a
  ``ChordError``, which it takes for retryable).
- ``combine_round`` checks that every part answered, adds the partial sums in part order
  into one ``WeightedMean`` and divides: the flat fold's sum in other brackets, equal to
  it within float64 rounding (bit for bit with one part; ``learning.strategies.aggregate``
  states the bound). Then the strategy's server step and the one model version, exactly
  as the flat fold does (``workers.tasks.plan.store_version``), which deletes the partial
  blobs in the same transaction.

Every task plans the round again from the database and checks the digest of its base
model and updates, so a part can never be added into another round's (or another
attempt's) sum. Each task refuses to run again after ``max_task_starts`` starts, as the
flat one does.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db import queries as q
from db.blobstore import BlobError
from db.engine import session_scope
from db.models import BlobKind
from learning.strategies import StrategyError, WeightedMean
from protocol.codec import CodecError
from workers.config import WorkerConfig
from workers.fold import UpdateRef, fold_partial, make_folder, no_usable_update
from workers.partials import (
    PartialBlobError,
    PartLabel,
    decode_partial,
    encode_partial,
    part_bounds,
)
from workers.pipeline.device import DeviceUnavailable
from workers.pipeline.folder import TorchFolder
from workers.pipeline.readahead import DEFAULT_DEPTH
from workers.tasks.common import AggregationError, blob_loader, sessions
from workers.tasks.plan import (
    COMBINE_STARTED,
    PARTIAL_STARTED,
    Folded,
    Plan,
    check_starts,
    existing_result,
    plan_round,
    record_failure,
    store_version,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitJob:
    """A round to fold in parts: what its partial and combine tasks are called with.

    ``began`` is the wall-clock time (``time.time()``) the aggregate task started: the
    combine may run in another process, where a monotonic clock would mean nothing.
    """

    run_id: str
    round_number: int
    attempt: int
    parts: int
    digest: str
    began: float

    def partial_args(self, part: int) -> list[Any]:
        return [self.run_id, self.round_number, self.attempt, part, self.parts, self.digest]

    def combine_args(self) -> list[Any]:
        return [
            self.run_id,
            self.round_number,
            self.attempt,
            self.parts,
            self.digest,
            self.began,
        ]


def usable_order(updates: Sequence[UpdateRef]) -> list[str]:
    """The blobs ``iter_deltas`` will ask for, in order (it skips the others unread)."""
    return [u.blob_sha for u in updates if u.blob_sha is not None and (u.num_samples or 0) > 0]


def fold_parts_here(config: WorkerConfig, job: SplitJob) -> dict[str, Any]:
    """Run a split round's parts one after the other in this process, then combine them
    (a plain call of ``aggregate_round``, outside Celery)."""
    partials = [partial_round(config, *job.partial_args(p)) for p in range(job.parts)]
    return combine_round(config, partials, *job.combine_args())


def partial_round(
    config: WorkerConfig,
    run_id: str,
    round_number: int,
    attempt: int,
    part: int,
    parts: int,
    digest: str,
    *,
    task_id: str | None = None,
) -> dict[str, Any]:
    """Fold part ``part`` of ``parts`` of the round into a stored partial-sum blob.

    Returns ``{"part", "parts", "blob_sha256" (None when none of the part's updates is
    usable), "num_updates", "num_samples", "clipped", "skipped", "fold_device",
    "seconds", "pid"}``; ``{"part", "parts", "done": True}`` when the round already has
    its version; ``{"part", "parts", "error"}`` for what a retry cannot fix. Database
    errors propagate (the Celery task retries them).
    """
    head = {"part": part, "parts": parts}
    began = time.perf_counter()
    factory = sessions(config.database_url)
    try:
        with session_scope(factory) as s:
            if existing_result(s, run_id, round_number) is not None:
                return {**head, "done": True}
            plan = _plan_split(s, config, run_id, round_number, attempt, parts, digest)
            lo, hi = part_bounds(len(plan.updates), parts, part)
            match = {"attempt": attempt, "part": part, "parts": parts}
            check_starts(s, config, run_id, round_number, PARTIAL_STARTED, match,
                         f"part {part} of {parts} of round {round_number}")  # fmt: skip
            detail = {**match, "updates": hi - lo, "task_id": task_id, "pid": os.getpid()}
            q.record_event(s, PARTIAL_STARTED, run_id=run_id, round=round_number, detail=detail)
        refs = plan.updates[lo:hi]
        try:
            folder = make_folder(plan.strategy, len(refs), config.device)
        except (ValueError, DeviceUnavailable) as e:
            raise AggregationError(str(e)) from e
        assert isinstance(folder, WeightedMean | TorchFolder)  # a weighted mean: plan_round
        delay = config.test_aggregate_delay_s
        try:
            result, partial = fold_partial(
                refs,
                blob_loader(factory, usable_order(refs)),
                plan.base,
                plan.strategy,
                limits=config.decode_limits,
                folder=folder,
                after_each=(lambda _u: time.sleep(delay)) if delay > 0 else None,
                decode_ahead=DEFAULT_DEPTH,
            )
        except StrategyError as e:
            raise AggregationError(str(e)) from e
        sha = None
        if partial is not None:
            label = PartLabel(run_id, round_number, part, parts, digest)
            blob = encode_partial(partial, result.counters, label)
            del partial  # the float64 sums: the blob holds them now
            with session_scope(factory) as s:
                sha = blobstore.put(s, blob, BlobKind.OTHER)
    except AggregationError as e:
        log.warning("run %s round %s part %d/%d: %s", run_id, round_number, part, parts, e)
        return {**head, "error": str(e)}
    return {
        **head,
        "blob_sha256": sha,
        "num_updates": len(result.folded),
        "num_samples": result.num_samples,
        "clipped": result.clipped,
        "skipped": result.skipped,
        "fold_device": str(folder.device) if isinstance(folder, TorchFolder) else "cpu",
        "seconds": round(time.perf_counter() - began, 3),
        "pid": os.getpid(),
    }


def combine_round(
    config: WorkerConfig,
    partials: Sequence[Mapping[str, Any]],
    run_id: str,
    round_number: int,
    attempt: int,
    parts: int,
    digest: str,
    began: float,
    *,
    task_id: str | None = None,
) -> dict[str, Any]:
    """Add the parts' sums and store the round's model version; the result is
    ``aggregate_round``'s. Raises AggregationError for what a retry cannot fix."""
    factory = sessions(config.database_url)
    try:
        with session_scope(factory) as s:
            done = existing_result(s, run_id, round_number)
            if done is not None:
                return done
            plan = _plan_split(s, config, run_id, round_number, attempt, parts, digest)
            match = {"attempt": attempt, "parts": parts}
            check_starts(s, config, run_id, round_number, COMBINE_STARTED, match,
                         f"the combine of round {round_number}")  # fmt: skip
            detail = {**match, "task_id": task_id, "pid": os.getpid()}
            q.record_event(s, COMBINE_STARTED, run_id=run_id, round=round_number, detail=detail)
        ordered = _check_answers(partials, parts)
        if any(p.get("done") for p in ordered):
            with session_scope(factory) as s:  # a part found the version stored already
                done = existing_result(s, run_id, round_number)
            if done is not None:
                return done
            raise AggregationError("a part saw a model version that is gone")
        folded, shas, load = _add_parts(config, factory, plan, ordered, run_id, round_number,
                                        parts, digest)  # fmt: skip
        if folded is None:
            with session_scope(factory) as s:  # a racing combine finished, spent the parts
                done = existing_result(s, run_id, round_number)
            if done is not None:
                return done
            raise AggregationError("a partial sum blob is gone and no version was stored")
        return store_version(config, factory, plan, folded, run_id, round_number, attempt,
                             load=load, began=began, discard=shas)  # fmt: skip
    except AggregationError as e:
        record_failure(factory, run_id, round_number, attempt, e)
        raise


def _plan_split(
    s: Session, config: WorkerConfig, run_id: str, round_number: int, attempt: int, parts: int,
    digest: str,
) -> Plan:  # fmt: skip
    plan = plan_round(s, config, run_id, round_number, attempt)
    if plan.digest != digest:
        raise AggregationError(
            f"round {round_number}'s base model or updates changed after it was split"
        )
    if plan.parts != parts:
        # The threshold, parts or strategy changed since the split (a redeployed worker, an
        # edited run config): folding on would mix two different cuts of the round.
        raise AggregationError(
            f"round {round_number} now splits into {plan.parts or 'no'} parts, not {parts}"
        )
    return plan


def _check_answers(partials: Sequence[Mapping[str, Any]], parts: int) -> list[Mapping[str, Any]]:
    by_part: dict[int, Mapping[str, Any]] = {}
    for p in partials:
        if not isinstance(p, Mapping) or p.get("parts") != parts or p.get("part") in by_part:
            raise AggregationError(f"unexpected partial result {p!r:.200}")
        by_part[int(p["part"])] = p
    if sorted(by_part) != list(range(parts)):
        raise AggregationError(f"partial results for parts {sorted(by_part)}, not 0..{parts - 1}")
    ordered = [by_part[i] for i in range(parts)]
    errors = [f"part {p['part']}: {p['error']}" for p in ordered if p.get("error")]
    if errors:
        raise AggregationError("; ".join(errors))
    return ordered


def _add_parts(
    config: WorkerConfig,
    factory: sessionmaker[Session],
    plan: Plan,
    ordered: list[Mapping[str, Any]],
    run_id: str,
    round_number: int,
    parts: int,
    digest: str,
) -> tuple[Folded | None, list[str], Callable[[str], bytes]]:
    """Add the parts' sums in part order; (None, ...) when a blob is gone (a racing
    combine stored the version and deleted them)."""
    shas = [str(p["blob_sha256"]) for p in ordered if p.get("blob_sha256")]
    load = blob_loader(factory, shas)
    acc = WeightedMean()
    counters: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    num_samples = clipped = 0
    for p in ordered:
        skipped.update(p.get("skipped") or {})
        sha = p.get("blob_sha256")
        if not sha:
            continue
        label = PartLabel(run_id, round_number, int(p["part"]), parts, digest)
        try:
            partial, part_counters = decode_partial(load(sha), plan.base, label,
                                                    config.decode_limits)  # fmt: skip
        except BlobError as e:
            log.warning("run %s round %s: partial sum %s: %s", run_id, round_number, sha, e)
            return None, shas, load
        except (CodecError, PartialBlobError) as e:
            raise AggregationError(f"part {p['part']}: its partial sum blob: {e}") from e
        if partial.count != p.get("num_updates") or partial.total_weight != p.get("num_samples"):
            raise AggregationError(f"part {p['part']}: its blob and its answer disagree")
        acc.add_partial(partial)
        del partial
        for name, value in part_counters.items():
            counters[name] = value if name not in counters else np.maximum(counters[name], value)
        num_samples += int(p["num_samples"])
        clipped += int(p.get("clipped") or 0)
    if not acc.count:
        raise AggregationError(no_usable_update(skipped))
    for name, value in plan.base.others.items():
        counters.setdefault(name, value)
    devices = sorted({str(p.get("fold_device", "cpu")) for p in ordered})
    folded = Folded(
        delta=acc.result(),
        counters=counters,
        num_updates=acc.count,
        num_samples=num_samples,
        clipped=clipped,
        skipped=skipped,
        fold_device=",".join(devices),
        metrics={
            "fold": "hierarchical",
            "parts": parts,
            "part_updates": [int(p.get("num_updates") or 0) for p in ordered],
            "part_s": [p.get("seconds") for p in ordered],
        },
    )
    return folded, shas, load
