"""``fedmq.aggregate``: one round's received updates -> the run's next global model version.

Reads everything from the database (the run's strategy config, the round, its received
updates, the base model and the server state; ``workers.tasks.plan``), folds the updates,
steps the strategy, and stores the new model as an fp32 codec blob and a model version for
the round.

Flat fold: the updates one at a time in client-id order into one float64 sum
(``workers.fold``). Decoding runs in a thread two updates ahead of the fold
(``workers.pipeline.readahead``), blobs are read a page at a time (``PagedLoader``); the
weighted-mean strategies fold on a GPU when the worker's device says so (``config.device``:
cpu, cuda, cuda:N, auto; ``workers.pipeline``).

Hierarchical fold: a round of more than ``split_threshold`` updates (worker config, or the
run's ``config["aggregation"]``) whose strategy is a weighted mean is cut into ``parts``
contiguous runs that ``fedmq.aggregate.partial`` tasks fold in parallel, each storing its
float64 partial sum as a blob; ``fedmq.aggregate.combine`` adds them in part order and
stores the version (``workers.tasks.split``). This task hands over to them with
``fan_out`` (in a worker the Celery task replaces itself with a chord, so it never waits
on them); eagerly, or in a plain call, the parts run one after the other here. FedMedian
and FedTrimmedAvg cannot be split and fold flat; the version's metrics say so
(``fold_note``).

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
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import queries as q
from db.engine import session_scope
from learning.strategies import Accumulator, StrategyError
from workers.config import WorkerConfig
from workers.fold import fold_updates, make_folder
from workers.pipeline.device import DeviceUnavailable
from workers.pipeline.folder import TorchFolder
from workers.pipeline.readahead import DEFAULT_DEPTH
from workers.tasks.buffered import fold_version_step, is_async_run
from workers.tasks.common import AggregationError, blob_loader, sessions
from workers.tasks.plan import (
    FAILED,
    STARTED,
    Folded,
    Plan,
    check_starts,
    existing_result,
    plan_round,
    record_failure,
    store_version,
)
from workers.tasks.privacy import PRIVACY_KEY, UnitWeights, release
from workers.tasks.secagg import aggregate_secure
from workers.tasks.split import SplitJob, fold_parts_here, usable_order

log = logging.getLogger(__name__)

__all__ = ["FAILED", "STARTED", "FanOut", "SplitJob", "aggregate_round"]

# Hands a split round to the partial and combine tasks; returns the combine's result (or,
# in a Celery worker, does not return: the task is replaced).
FanOut = Callable[[SplitJob], dict[str, Any]]


def aggregate_round(
    config: WorkerConfig,
    run_id: str,
    round_number: int,
    attempt: int,
    *,
    task_id: str | None = None,
    fan_out: FanOut | None = None,
    secagg: str | None = None,
) -> dict[str, Any]:
    """Aggregate round ``round_number`` of ``run_id``; see the module docstring.

    Returns ``{"model_version", "blob_sha256", "num_updates", "num_samples", "created"}``.
    Raises AggregationError for what a retry cannot fix; database errors propagate (the
    Celery task retries them). ``fan_out`` runs a split round's parts (default: here, one
    after the other). ``secagg``: a secure round's unmasking material (the sha256 of its
    blob, ``workers.tasks.secagg``); a secure run's round without it is refused.
    """
    factory = sessions(config.database_url)
    began = time.time()
    try:
        with session_scope(factory) as s:
            done = existing_result(s, run_id, round_number)
            if done is not None:
                return done
            plan = plan_round(s, config, run_id, round_number, attempt)
            run = q.get_run(s, run_id)
            buffered = run is not None and is_async_run(run.config or {})
            secure = run is not None and (run.config or {}).get("secagg") is not None
            check_starts(
                s, config, run_id, round_number, STARTED, {"attempt": attempt},
                f"round {round_number} attempt {attempt}",
            )  # fmt: skip
            detail: dict[str, Any] = {"attempt": attempt, "task_id": task_id, "pid": os.getpid()}
            if plan.parts:
                detail["parts"] = plan.parts
            q.record_event(s, STARTED, run_id=run_id, round=round_number, detail=detail)
        if secure:
            return aggregate_secure(config, factory, plan, run_id, round_number, attempt,
                                    secagg, began)  # fmt: skip
        if buffered:
            # An async run's version step: staleness-weighted, never split.
            return fold_version_step(config, factory, plan, run_id, round_number, attempt, began)
        if plan.parts:
            job = SplitJob(run_id, round_number, attempt, plan.parts, plan.digest, began)
            log.info("run %s round %s: %d updates folded in %d parts", run_id, round_number,
                     len(plan.updates), plan.parts)  # fmt: skip
            if fan_out is None:
                return fold_parts_here(config, job)
            return fan_out(job)
        return _aggregate_flat(config, factory, plan, run_id, round_number, attempt, began)
    except AggregationError as e:
        record_failure(factory, run_id, round_number, attempt, e)
        raise


def _aggregate_flat(
    config: WorkerConfig,
    factory: sessionmaker[Session],
    plan: Plan,
    run_id: str,
    round_number: int,
    attempt: int,
    began: float,
) -> dict[str, Any]:
    load = blob_loader(factory, usable_order(plan.updates))
    delay = config.test_aggregate_delay_s
    try:
        folder = make_folder(plan.strategy, len(plan.updates), config.device)
    except (ValueError, DeviceUnavailable) as e:
        raise AggregationError(str(e)) from e
    dp = plan.privacy
    fold_into: Accumulator = UnitWeights(folder) if dp is not None and dp.central else folder
    try:
        result = fold_updates(
            plan.updates,
            load,
            plan.base,
            plan.strategy,
            limits=config.decode_limits,
            folder=fold_into,
            after_each=(lambda _u: time.sleep(delay)) if delay > 0 else None,
            decode_ahead=DEFAULT_DEPTH,
        )
    except StrategyError as e:
        raise AggregationError(str(e)) from e
    how: dict[str, Any] = {"fold": "flat"}
    if plan.fold_note:
        how["fold_note"] = plan.fold_note
    if dp is not None:
        how[PRIVACY_KEY] = release(
            dp, result.delta, len(result.folded), result.clipped, run_id, round_number
        )
    folded = Folded(
        delta=result.delta,
        counters=result.counters,
        num_updates=len(result.folded),
        num_samples=result.num_samples,
        clipped=result.clipped,
        skipped=result.skipped,
        fold_device=str(folder.device) if isinstance(folder, TorchFolder) else "cpu",
        metrics=how,
    )
    del result
    return store_version(
        config, factory, plan, folded, run_id, round_number, attempt, load=load, began=began
    )
