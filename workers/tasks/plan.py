"""What the aggregation tasks share: planning a round (read and check everything a fold
needs), the flat-or-split decision, and storing the round's one model version.

``fedmq.aggregate`` (``workers.tasks.aggregate``) folds a round flat or splits it; the
split's ``fedmq.aggregate.partial`` and ``fedmq.aggregate.combine`` (``workers.tasks.split``)
plan the same round again from the database, so all three see the same strategy, base
model and updates, and the digest of those (``workers.partials.updates_digest``) proves it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db import queries as q
from db.engine import session_scope
from db.models import BlobKind, ModelVersion
from learning.strategies import State, Strategy, StrategyError, strategy_from_config
from protocol.codec import CodecError, DecodeLimits, Encoding, decode, encode
from workers.config import WorkerConfig
from workers.fold import GlobalModel, UpdateRef, folds_linearly, split_refusal
from workers.partials import updates_digest
from workers.tasks.common import AggregationError
from workers.tasks.privacy import RoundPrivacy, plan_privacy

log = logging.getLogger(__name__)

STARTED = "aggregate.started"
DONE = "aggregate.done"
FAILED = "aggregate.failed"
SKIPPED = "aggregate.update_skipped"
PARTIAL_STARTED = "aggregate.partial_started"
COMBINE_STARTED = "aggregate.combine_started"
STATE_KEY = "server_state"
# A run's own split settings: ``config["aggregation"] = {"split_threshold": N, "parts": P}``.
RUN_KEY = "aggregation"


@dataclass(frozen=True)
class Plan:
    """A round ready to fold. ``parts`` 0 folds flat; P >= 1 folds in P parts (1 is
    only useful to tests: it is the flat result bit for bit, through the split's tasks).
    ``fold_note`` says why a round past the threshold still folds flat."""

    round_id: int
    strategy: Strategy
    base: GlobalModel
    base_version: int
    base_sha: str
    order: list[str]
    state_sha: str | None
    updates: list[UpdateRef]
    parts: int = 0
    fold_note: str | None = None
    digest: str = field(default="")
    privacy: RoundPrivacy | None = None


def existing_result(s: Session, run_id: str, round_number: int) -> dict[str, Any] | None:
    """The result of an earlier successful run for this round, or None."""
    rnd = q.get_round(s, run_id, round_number)
    if rnd is None:
        raise AggregationError(f"run {run_id!r} has no round {round_number}")
    if rnd.model_version_id is None:
        return None
    mv = q.get_model_version_by_id(s, rnd.model_version_id)
    return None if mv is None else result_of(mv, created=False)


def result_of(mv: ModelVersion, *, created: bool) -> dict[str, Any]:
    return {
        "model_version": mv.version,
        "blob_sha256": mv.blob_sha,
        "num_updates": int(mv.metrics.get("num_updates", 0)),
        "num_samples": int(mv.metrics.get("num_samples", 0)),
        "created": created,
        # The orchestrator stops the run when this version spent its privacy budget.
        "budget_spent": (mv.metrics.get("privacy") or {}).get("budget_spent"),
    }


def record_failure(
    factory: sessionmaker[Session], run_id: str, round_number: int, attempt: int, error: Exception
) -> None:
    detail = {"attempt": attempt, "error": str(error)}
    try:
        with session_scope(factory) as s:
            known = q.get_run(s, run_id) is not None  # the event's run_id is a foreign key
            q.record_event(
                s, FAILED, run_id=run_id if known else None, round=round_number, detail=detail
            )
    except SQLAlchemyError:
        log.exception("could not record the failure of run %s round %s", run_id, round_number)


def check_starts(
    s: Session,
    config: WorkerConfig,
    run_id: str,
    round_number: int,
    kind: str,
    match: Mapping[str, Any],
    what: str,
) -> None:
    """Refuse a task found started ``max_task_starts`` times without finishing (a message
    that kills its worker every time would otherwise be redelivered forever: acks_late).
    ``match``: the detail fields that make two starts the same task."""
    starts = [
        e
        for e in q.list_events(s, run_id, kinds=[kind], limit=1000)
        if e.round == round_number and all(e.detail.get(k) == v for k, v in match.items())
    ]
    if len(starts) >= config.max_task_starts:
        raise AggregationError(
            f"{what} was started {len(starts)} times without finishing (the worker died each "
            "time?); giving up"
        )


def plan_round(
    s: Session, config: WorkerConfig, run_id: str, round_number: int, attempt: int
) -> Plan:
    run = q.get_run(s, run_id)
    rnd = q.get_round(s, run_id, round_number)
    if run is None or rnd is None:
        raise AggregationError(f"run {run_id!r} has no round {round_number}")
    if rnd.attempt != attempt:
        raise AggregationError(
            f"stale task: round {round_number} is at attempt {rnd.attempt}, not {attempt}"
        )
    try:
        strategy = strategy_from_config(run.config.get("strategy"))
    except StrategyError as e:
        raise AggregationError(f"run config: {e}") from e
    threshold, parts = split_settings(config, run.config.get(RUN_KEY))
    base_mv = q.get_model_version_by_id(s, rnd.base_version_id) if rnd.base_version_id else None
    if base_mv is None:
        raise AggregationError(f"round {round_number} has no base model version")
    base_tensors = decode_model(blobstore.get(s, base_mv.blob_sha), config.decode_limits)
    base = GlobalModel.from_tensors(base_tensors, str(base_mv.version), base_mv.blob_sha)
    updates = [
        UpdateRef(p.client_id, p.update_sha, p.num_samples) for p in q.received_updates(s, rnd.id)
    ]
    if not updates:
        raise AggregationError(f"round {round_number} has no received update")
    try:
        strategy.check_memory(len(updates), base.nbytes, config.max_aggregation_bytes)
    except StrategyError as e:
        raise AggregationError(str(e)) from e
    saved = base_mv.metrics.get(STATE_KEY) or {}
    state_sha = saved.get("sha256") if saved.get("strategy") == strategy.name else None
    privacy = _central_privacy(plan_privacy(s, run, rnd, base_mv), strategy)
    split, note = 0, None
    if len(updates) > threshold:
        refusal = split_refusal(strategy)
        if privacy is not None and privacy.central:
            refusal = "central DP draws its noise once, where the whole sum is"
        if refusal is None:
            split = min(parts, len(updates))
        else:
            note = f"{len(updates)} updates > split threshold {threshold}, folded flat: {refusal}"
            log.info("run %s round %s: %s", run_id, round_number, note)
    return Plan(
        rnd.id,
        strategy,
        base,
        base_mv.version,
        base_mv.blob_sha,
        list(base_tensors),
        state_sha,
        updates,
        parts=split,
        fold_note=note,
        digest=updates_digest(base_mv.blob_sha, updates),
        privacy=privacy,
    )


def _central_privacy(privacy: RoundPrivacy | None, strategy: Strategy) -> RoundPrivacy | None:
    """Central DP: a weighted-mean strategy whose clip is DP-FedAvg's for this round (the
    adaptive one moves from round to round)."""
    if privacy is not None and privacy.central:
        if not folds_linearly(strategy):
            raise AggregationError(
                f"run config: central DP needs a weighted-mean strategy, not {strategy.name}"
            )
        strategy.clip_norm = privacy.clip_norm
    return privacy


def split_settings(config: WorkerConfig, run_settings: Any) -> tuple[int, int]:
    """(threshold, parts): the worker's, overridden by the run's ``aggregation`` config."""
    threshold, parts = config.split_threshold, config.split_parts
    if run_settings is None:
        return threshold, parts
    if not isinstance(run_settings, Mapping):
        raise AggregationError(f"run config: {RUN_KEY} must be an object")
    unknown = set(run_settings) - {"split_threshold", "parts"}
    if unknown:
        raise AggregationError(f"run config: unknown {RUN_KEY} keys {sorted(unknown)}")
    threshold = _count(run_settings, "split_threshold", threshold, 0)
    parts = _count(run_settings, "parts", parts, 1)
    return threshold, parts


def _count(settings: Mapping[str, Any], key: str, default: int, least: int) -> int:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise AggregationError(f"run config: {RUN_KEY}.{key} must be an integer >= {least}")
    return value


def decode_model(blob: bytes, limits: DecodeLimits, what: str = "base model") -> dict[str, Any]:
    try:
        decoded = decode(blob, limits=limits)
    except CodecError as e:
        raise AggregationError(f"{what} blob: {e}") from e
    if decoded.delta:
        raise AggregationError(f"{what} blob is a delta, not full values")
    return decoded.tensors


@dataclass
class Folded:
    """A round's combined delta and what the fold(s) found along the way."""

    delta: dict[str, np.ndarray]
    counters: dict[str, np.ndarray]
    num_updates: int
    num_samples: int
    clipped: int
    skipped: dict[str, str]
    fold_device: str
    metrics: dict[str, Any]  # how it was folded: flat or hierarchical, and the parts


def store_version(
    config: WorkerConfig,
    factory: sessionmaker[Session],
    plan: Plan,
    folded: Folded,
    run_id: str,
    round_number: int,
    attempt: int,
    *,
    load: Callable[[str], bytes],
    began: float,
    discard: Sequence[str] = (),
) -> dict[str, Any]:
    """Step the strategy and store the round's model version (once: a racing run meets
    the unique constraint and returns the first's). ``discard``: blobs that are spent
    once the version exists (the partial sums), deleted in the same transaction."""
    state: State = {}
    if plan.state_sha:
        state = decode_model(load(plan.state_sha), config.decode_limits, "server state")
    new_floats, new_state = plan.strategy.step(plan.base.floats, folded.delta, state)
    counters = folded.counters
    tensors = {n: new_floats[n] if n in new_floats else counters[n] for n in plan.order}
    meta = {"run_id": run_id, "round": str(round_number), "strategy": plan.strategy.name}
    model_blob = encode(tensors, Encoding.FP32, metadata=meta)
    state_blob = encode(new_state, Encoding.FP32) if new_state else None
    del tensors, new_floats, new_state
    folded.delta = {}  # the float64 sums can go before the database work
    metrics: dict[str, Any] = {
        "strategy": plan.strategy.config(),
        "base_version": plan.base_version,
        "attempt": attempt,
        "num_updates": folded.num_updates,
        "num_samples": folded.num_samples,
        "clipped": folded.clipped,
        "skipped": folded.skipped,
        "fold_device": folded.fold_device,
        **folded.metrics,
        "aggregate_s": round(time.time() - began, 3),
    }
    try:
        with session_scope(factory) as s:
            sha = blobstore.put(s, model_blob, BlobKind.MODEL)
            if state_blob is not None:
                state_sha = blobstore.put(s, state_blob, BlobKind.OTHER)
                metrics[STATE_KEY] = {"sha256": state_sha, "strategy": plan.strategy.name}
            mv, created = q.create_model_version(
                s, run_id, sha, round_id=plan.round_id, metrics=metrics
            )
            if created:
                if discard:
                    blobstore.discard(s, list(discard))
                _record_done(s, run_id, round_number, mv, folded.skipped)
            return result_of(mv, created=created)
    except IntegrityError:
        # Lost a race with another run of this task: return the version it stored.
        with session_scope(factory) as s:
            done = existing_result(s, run_id, round_number)
        if done is None:
            raise
        return done


def _record_done(
    s: Session, run_id: str, round_number: int, mv: ModelVersion, skipped: dict[str, str]
) -> None:
    for client_id, reason in skipped.items():
        q.record_event(
            s,
            SKIPPED,
            run_id=run_id,
            round=round_number,
            client_id=client_id,
            detail={"reason": reason},
        )
    q.record_event(
        s,
        DONE,
        run_id=run_id,
        round=round_number,
        detail={"model_version": mv.version, "num_updates": mv.metrics.get("num_updates")},
    )
    log.info("run %s round %s: model version %s", run_id, round_number, mv.version)
