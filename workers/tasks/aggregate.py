"""``fedmq.aggregate``: one round's received updates -> the run's next global model version.

Reads everything from the database (the run's strategy config, the round, its received
updates, the base model and the server state), folds the updates one at a time
(``workers.fold``), steps the strategy, and stores the new model as an fp32 codec blob and
a model version for the round. Decoding runs in a thread two updates ahead of the fold
(``workers.pipeline.readahead``); the weighted-mean strategies fold on a GPU when the
worker's device says so (``config.device``: cpu, cuda, cuda:N, auto; ``workers.pipeline``).

Idempotent: a round that already has a model version returns it (``created=False``)
without aggregating again, and two runs racing for one round meet the unique constraint
on ``model_versions.round_id``: one inserts, the other returns the first's version.
The result is deterministic (updates fold in client-id order in float64; no timestamps
in the blob), so a racing loser computed the same bytes anyway.

Server state (FedAvgM's momentum, FedAdam's moments) is an fp32 codec blob (kind
``other``) named in the new version's metrics as ``server_state: {"sha256", "strategy"}``;
the next round reads it from its base version. A retried or re-run round therefore
always starts from the state its base model was made with.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db import queries as q
from db.engine import session_scope
from db.models import BlobKind, ModelVersion
from learning.strategies import State, Strategy, StrategyError, strategy_from_config
from protocol.codec import CodecError, DecodeLimits, Encoding, decode, encode
from workers.config import WorkerConfig
from workers.fold import GlobalModel, UpdateRef, fold_updates, make_folder
from workers.pipeline.device import DeviceUnavailable
from workers.pipeline.folder import TorchFolder
from workers.pipeline.readahead import DEFAULT_DEPTH as DECODE_AHEAD
from workers.tasks.common import AggregationError, blob_loader, sessions

log = logging.getLogger(__name__)

STARTED = "aggregate.started"
DONE = "aggregate.done"
FAILED = "aggregate.failed"
SKIPPED = "aggregate.update_skipped"
STATE_KEY = "server_state"


@dataclass(frozen=True)
class _Plan:
    round_id: int
    strategy: Strategy
    base: GlobalModel
    base_version: int
    order: list[str]
    state_sha: str | None
    updates: list[UpdateRef]


def aggregate_round(
    config: WorkerConfig,
    run_id: str,
    round_number: int,
    attempt: int,
    *,
    task_id: str | None = None,
) -> dict[str, Any]:
    """Aggregate round ``round_number`` of ``run_id``; see the module docstring.

    Returns ``{"model_version", "blob_sha256", "num_updates", "num_samples", "created"}``.
    Raises AggregationError for what a retry cannot fix; database errors propagate (the
    Celery task retries them).
    """
    factory = sessions(config.database_url)
    try:
        with session_scope(factory) as s:
            done = existing_result(s, run_id, round_number)
            if done is not None:
                return done
            plan = _plan(s, config, run_id, round_number, attempt)
            detail = {"attempt": attempt, "task_id": task_id, "pid": os.getpid()}
            q.record_event(s, STARTED, run_id=run_id, round=round_number, detail=detail)
        return _aggregate(config, factory, plan, run_id, round_number, attempt)
    except AggregationError as e:
        _record_failure(factory, run_id, round_number, attempt, e)
        raise


def _record_failure(
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


def existing_result(s: Session, run_id: str, round_number: int) -> dict[str, Any] | None:
    """The result of an earlier successful run for this round, or None."""
    rnd = q.get_round(s, run_id, round_number)
    if rnd is None:
        raise AggregationError(f"run {run_id!r} has no round {round_number}")
    if rnd.model_version_id is None:
        return None
    mv = q.get_model_version_by_id(s, rnd.model_version_id)
    return None if mv is None else _result(mv, created=False)


def _result(mv: ModelVersion, *, created: bool) -> dict[str, Any]:
    return {
        "model_version": mv.version,
        "blob_sha256": mv.blob_sha,
        "num_updates": int(mv.metrics.get("num_updates", 0)),
        "num_samples": int(mv.metrics.get("num_samples", 0)),
        "created": created,
    }


def _plan(s: Session, config: WorkerConfig, run_id: str, round_number: int, attempt: int) -> _Plan:
    run = q.get_run(s, run_id)
    rnd = q.get_round(s, run_id, round_number)
    if run is None or rnd is None:
        raise AggregationError(f"run {run_id!r} has no round {round_number}")
    if rnd.attempt != attempt:
        raise AggregationError(
            f"stale task: round {round_number} is at attempt {rnd.attempt}, not {attempt}"
        )
    starts = [
        e
        for e in q.list_events(s, run_id, kinds=[STARTED], limit=1000)
        if e.round == round_number and e.detail.get("attempt") == attempt
    ]
    if len(starts) >= config.max_task_starts:
        raise AggregationError(
            f"round {round_number} attempt {attempt} was started {len(starts)} times without "
            "finishing (the worker died each time?); giving up"
        )
    try:
        strategy = strategy_from_config(run.config.get("strategy"))
    except StrategyError as e:
        raise AggregationError(f"run config: {e}") from e
    base_mv = q.get_model_version_by_id(s, rnd.base_version_id) if rnd.base_version_id else None
    if base_mv is None:
        raise AggregationError(f"round {round_number} has no base model version")
    base_tensors = _decode_model(blobstore.get(s, base_mv.blob_sha), config.decode_limits)
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
    return _Plan(rnd.id, strategy, base, base_mv.version, list(base_tensors), state_sha, updates)


def _decode_model(blob: bytes, limits: DecodeLimits, what: str = "base model") -> dict[str, Any]:
    try:
        decoded = decode(blob, limits=limits)
    except CodecError as e:
        raise AggregationError(f"{what} blob: {e}") from e
    if decoded.delta:
        raise AggregationError(f"{what} blob is a delta, not full values")
    return decoded.tensors


def _aggregate(
    config: WorkerConfig,
    factory: sessionmaker[Session],
    plan: _Plan,
    run_id: str,
    round_number: int,
    attempt: int,
) -> dict[str, Any]:
    began = time.perf_counter()
    load = blob_loader(factory)
    delay = config.test_aggregate_delay_s
    try:
        folder = make_folder(plan.strategy, len(plan.updates), config.device)
    except (ValueError, DeviceUnavailable) as e:
        raise AggregationError(str(e)) from e
    try:
        folded = fold_updates(
            plan.updates,
            load,
            plan.base,
            plan.strategy,
            limits=config.decode_limits,
            folder=folder,
            after_each=(lambda _u: time.sleep(delay)) if delay > 0 else None,
            decode_ahead=DECODE_AHEAD,
        )
    except StrategyError as e:
        raise AggregationError(str(e)) from e
    state: State = {}
    if plan.state_sha:
        state = _decode_model(load(plan.state_sha), config.decode_limits, "server state")
    new_floats, new_state = plan.strategy.step(plan.base.floats, folded.delta, state)
    tensors = {n: new_floats[n] if n in new_floats else folded.counters[n] for n in plan.order}
    meta = {"run_id": run_id, "round": str(round_number), "strategy": plan.strategy.name}
    model_blob = encode(tensors, Encoding.FP32, metadata=meta)
    state_blob = encode(new_state, Encoding.FP32) if new_state else None
    del tensors, new_floats, new_state
    folded.delta = {}  # the float64 sums can go before the database work
    metrics: dict[str, Any] = {
        "strategy": plan.strategy.config(),
        "base_version": plan.base_version,
        "attempt": attempt,
        "num_updates": len(folded.folded),
        "num_samples": folded.num_samples,
        "clipped": folded.clipped,
        "skipped": folded.skipped,
        "fold_device": str(folder.device) if isinstance(folder, TorchFolder) else "cpu",
        "aggregate_s": round(time.perf_counter() - began, 3),
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
                _record_done(s, run_id, round_number, mv, folded.skipped)
            return _result(mv, created=created)
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
