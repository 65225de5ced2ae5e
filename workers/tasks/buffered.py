"""The fold of an async run's version step: staleness-weighted buffered deltas (FedBuff).

A version step is a round (``orchestrator.state.buffered``) whose updates were trained on
different versions. Each update is a delta against the version it started from (its blob
names it; full weights are turned into a delta against that version). With ``s_i`` the
step's base version minus update ``i``'s base version, ``f`` the run's staleness policy
(``learning.staleness``), ``n_i`` its samples and ``eta`` the server learning rate:

    delta = eta * sum_i f(s_i) * n_i * d_i / sum_i n_i

A buffer of fresh updates is therefore FedAvg's mean delta; stale ones count less. The
run's strategy then takes its server step with that delta (FedAvg adds it; FedAvgM and
FedAdam keep their moments across versions, as across rounds), so a server optimiser
composes. Updates fold in client-id order in float64: the version is deterministic given
its buffer. Non-float tensors keep the step's base values.

The strategy's ``clip_norm`` holds over a buffer as over a round: each update's delta is
clipped to that global L2 norm before it is weighted. A robust strategy (FedMedian,
FedTrimmedAvg) reduces the buffer coordinate-wise instead of averaging it: its statistic
over the staleness-weighted deltas ``f(s_i) * d_i`` (sample counts ignored, as robust
strategies do in rounds), times ``eta``.

Run config: ``config["async"] = {"staleness": "poly"|"constant"|"hinge", "server_lr": x}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db import queries as q
from db.engine import session_scope
from learning.staleness import check_policy, histogram, is_finite_lr, weight
from learning.strategies.clip import clip_by_norm
from protocol.codec import CodecError, DecodeLimits, decode
from workers.config import WorkerConfig
from workers.fold import split_floats
from workers.tasks.common import AggregationError, blob_loader
from workers.tasks.plan import Folded, Plan, decode_model, store_version

RUN_KEY = "async"


def is_async_run(config: Mapping[str, Any]) -> bool:
    policy = config.get("policy")
    return isinstance(policy, Mapping) and policy.get("mode") == "async"


def async_settings(config: Mapping[str, Any]) -> tuple[str, float]:
    """(staleness policy, server learning rate) of a run's config."""
    raw = config.get(RUN_KEY) or {}
    if not isinstance(raw, Mapping):
        raise AggregationError(f"run config: {RUN_KEY} must be an object")
    unknown = set(raw) - {"staleness", "server_lr"}
    if unknown:
        raise AggregationError(f"run config: unknown {RUN_KEY} keys {sorted(unknown)}")
    try:
        policy = check_policy(str(raw.get("staleness", "poly")))
    except ValueError as e:
        raise AggregationError(f"run config: {e}") from e
    lr = raw.get("server_lr", 1.0)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not is_finite_lr(float(lr)):
        raise AggregationError(f"run config: {RUN_KEY}.server_lr must be a number > 0")
    return policy, float(lr)


def max_staleness(config: Mapping[str, Any]) -> int | None:
    """The run policy's staleness bound (None where the config has none)."""
    policy = config.get("policy")
    raw = policy.get("max_staleness") if isinstance(policy, Mapping) else None
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else None


def buffered_delta(
    updates: list[tuple[str, int, int, dict[str, np.ndarray]]],
    step_base: int,
    policy: str,
    server_lr: float,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """The step's delta from ``(client_id, num_samples, base_version, delta)`` updates,
    and each one's staleness in client-id order. Pure: the replica in the tests and this
    module's task share it."""
    total = sum(n for _, n, _, _ in updates)
    if total <= 0:
        raise AggregationError("a version step needs at least one sample")
    acc: dict[str, np.ndarray] = {}
    stalenesses: list[int] = []
    for _, n, base, delta in sorted(updates, key=lambda u: u[0]):
        s = step_base - base
        stalenesses.append(s)
        w = weight(policy, s) * n
        for name, d in delta.items():
            term = np.asarray(d, dtype=np.float64) * w
            acc[name] = term if name not in acc else acc[name] + term
    scale = server_lr / total
    return {name: a * scale for name, a in acc.items()}, stalenesses


def clip_updates(
    updates: list[tuple[str, int, int, dict[str, np.ndarray]]], clip_norm: float | None
) -> tuple[list[tuple[str, int, int, dict[str, np.ndarray]]], int]:
    """Each update's delta clipped to ``clip_norm`` (global L2 norm; None: off), and how
    many were scaled down."""
    if clip_norm is None:
        return updates, 0
    out, clipped = [], 0
    for cid, n, base, delta in updates:
        scaled, norm = clip_by_norm(delta, clip_norm)
        clipped += int(norm > clip_norm)
        out.append((cid, n, base, scaled))
    return out, clipped


def robust_buffered_delta(
    updates: list[tuple[str, int, int, dict[str, np.ndarray]]],
    step_base: int,
    policy: str,
    server_lr: float,
    reduce: Callable[[Mapping[str, np.ndarray], np.ndarray], dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], list[int]]:
    """A robust strategy's ``reduce`` over the buffer: its coordinate-wise statistic of
    the staleness-weighted deltas (each update once, whatever its samples), times the
    server learning rate. Stale updates are shrunk toward zero before the statistic, so
    they pull the result less."""
    ordered = sorted(updates, key=lambda u: u[0])
    stalenesses = [step_base - base for _, _, base, _ in ordered]
    factors = [weight(policy, s) for s in stalenesses]
    names = list(ordered[0][3])
    stacks = {
        name: np.stack(
            [
                np.asarray(d[name], dtype=np.float64) * f
                for (_, _, _, d), f in zip(ordered, factors, strict=True)
            ]
        )
        for name in names
    }
    reduced = reduce(stacks, np.ones(len(ordered)))
    return {
        name: np.asarray(r, dtype=np.float64) * server_lr for name, r in reduced.items()
    }, stalenesses


def fold_version_step(
    config: WorkerConfig,
    factory: sessionmaker[Session],
    plan: Plan,
    run_id: str,
    round_number: int,
    attempt: int,
    began: float,
) -> dict[str, Any]:
    with session_scope(factory) as s:
        run = q.get_run(s, run_id)
        run_config = dict(run.config or {}) if run is not None else {}
    policy, server_lr = async_settings(run_config)
    bound = max_staleness(run_config)
    if plan.privacy is not None and plan.privacy.central:
        # Noise and the accountant are per round of DP-FedAvg; a version step has neither
        # here. Refused rather than folded without the noise the run asked for.
        raise AggregationError(
            "run config: central DP over an async buffer is not supported; use local DP"
        )
    load = blob_loader(factory, [u.blob_sha for u in plan.updates if u.blob_sha])
    models: dict[int, dict[str, np.ndarray]] = {plan.base_version: plan.base.floats}
    prepared: list[tuple[str, int, int, dict[str, np.ndarray]]] = []
    skipped: dict[str, str] = {}
    for ref in sorted(plan.updates, key=lambda u: u.client_id):
        try:
            item = _prepare(ref.blob_sha, load, plan, config.decode_limits, models, factory,
                            run_id)  # fmt: skip
        except (CodecError, blobstore.BlobError, ValueError) as e:
            skipped[ref.client_id] = str(e)
            continue
        base_version, delta = item
        if base_version > plan.base_version:
            skipped[ref.client_id] = f"trained on version {base_version}, after the step's base"
            continue
        if bound is not None and plan.base_version - base_version > bound:
            # The machine drops such updates before a step opens; this guards the fold
            # itself, so a stale update is refused with why, never folded silently.
            stale = plan.base_version - base_version
            skipped[ref.client_id] = f"{stale} versions stale, more than max_staleness {bound}"
            continue
        prepared.append((ref.client_id, int(ref.num_samples or 1), base_version, delta))
        if config.test_aggregate_delay_s:
            time.sleep(config.test_aggregate_delay_s)  # the fault tests' window to kill in
    if not prepared:
        raise AggregationError(f"version step {round_number}: no usable update ({skipped})")
    strategy = plan.strategy
    prepared, clipped = clip_updates(prepared, strategy.clip_norm)
    if strategy.streaming:
        delta, stalenesses = buffered_delta(prepared, plan.base_version, policy, server_lr)
    else:
        delta, stalenesses = robust_buffered_delta(
            prepared, plan.base_version, policy, server_lr, strategy.reduce
        )
    folded = Folded(
        delta=delta,
        counters=dict(plan.base.others),
        num_updates=len(prepared),
        num_samples=sum(n for _, n, _, _ in prepared),
        clipped=clipped,
        skipped=skipped,
        fold_device="cpu",
        metrics={
            "fold": "buffered",
            # How the buffer was combined: the staleness-weighted mean, or a robust
            # strategy's statistic of the staleness-weighted deltas.
            "buffer_reduce": "mean" if strategy.streaming else strategy.name,
            "staleness_policy": policy,
            "server_lr": server_lr,
            "staleness": stalenesses,
            "staleness_hist": histogram(stalenesses),
            "staleness_mean": round(float(np.mean(stalenesses)), 4),
            "staleness_max": max(stalenesses),
            "finished_at": time.time(),
        },
    )
    return store_version(
        config, factory, plan, folded, run_id, round_number, attempt, load=load, began=began
    )


def _prepare(
    sha: str | None,
    load: Callable[[str], bytes],
    plan: Plan,
    limits: DecodeLimits,
    models: dict[int, dict[str, np.ndarray]],
    factory: sessionmaker[Session],
    run_id: str,
) -> tuple[int, dict[str, np.ndarray]]:
    """(base version, float delta) of one stored update."""
    if not sha:
        raise ValueError("no stored blob")
    decoded = decode(load(sha), limits=limits, expected=plan.base.spec)
    if decoded.base_version is None or not decoded.base_version.isdigit():
        raise ValueError(f"the update names no base version ({decoded.base_version!r})")
    base_version = int(decoded.base_version)
    floats, _ = split_floats(decoded.tensors)
    if decoded.delta:
        return base_version, floats
    base = models.get(base_version)
    if base is None:
        with session_scope(factory) as s:
            mv = q.get_model_version(s, run_id, base_version)
            if mv is None:
                raise ValueError(f"run has no model version {base_version}")
            base, _ = split_floats(decode_model(blobstore.get(s, mv.blob_sha), limits))
        models[base_version] = base
    return base_version, {n: floats[n] - base[n] for n in floats}
