"""The invariant check of an async (FedBuff) run: ``invariants.py`` in its async form.

1. Nothing acknowledged is lost or counted twice: every update a device saw acknowledged
   (an ``update.accepted`` notice, correlated by message id) was buffered exactly once
   (one ``update.buffered`` event; or it was a second update for a ticket already
   buffered, recorded as ignored), and every buffered update is in exactly one version
   step's recorded updates, or was dropped from the buffer with a recorded reason (too
   stale by the time its step opened), or still waits in the buffer (the snapshot).
2. Every version equals the previous plus the weighted buffered deltas recorded for it:
   recomputed here independently of the worker (its own decode of the stored blobs, in
   float64): ``base + lr * sum(f(s_i) * n_i * delta_i) / sum(n_i)`` (each delta clipped
   first where the strategy has a ``clip_norm``), ``s_i`` the step's
   base minus the version update ``i`` was trained on, ``f`` the run's staleness policy.
   The stalenesses the version records must be those.
3. No step is stuck: every round is done, or failed (and then says why).

Steps are verified once, when first seen closed, and remembered, as ``invariants.py``
does (update blobs of old rounds may be pruned).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db import queries as q
from db.engine import session_scope
from db.models import ModelVersion, Round, RoundState
from learning.staleness import weight
from orchestrator.store import load
from protocol.codec import decode
from tests.faults.invariants import CLOSED, InvariantViolation

SETTLED = {RoundState.DONE, RoundState.FAILED}


@dataclass
class AsyncInvariants:
    sessions: sessionmaker[Session]
    run_id: str
    verified: set[int] = field(default_factory=set)
    stored: int = 0  # updates folded into the verified versions
    folded: list[tuple[str, str]] = field(default_factory=list)  # (client, ref) per update

    def verify(self) -> None:
        """Recompute every closed version step not verified yet."""
        with session_scope(self.sessions) as s:
            run = q.get_run(s, self.run_id)
            config = dict(run.config or {}) if run is not None else {}
            raw = dict(config.get("async") or {})
            policy, lr = str(raw.get("staleness", "poly")), float(raw.get("server_lr", 1.0))
            strategy = dict(config.get("strategy") or {})
            if strategy.get("name", "fedavg") not in ("fedavg", "fedprox"):
                raise InvariantViolation(f"the check recomputes FedAvg folds, not {strategy}")
            clip = strategy.get("clip_norm")
            for rnd in q.list_rounds(s, self.run_id):
                if rnd.number in self.verified or rnd.model_version_id is None:
                    continue
                if rnd.state not in CLOSED:
                    continue
                pairs = _check_step(s, rnd, policy, lr, clip)
                self.folded += pairs
                self.stored += len(pairs)
                self.verified.add(rnd.number)

    def check(self, acknowledged: Iterable[str] | None = None, settle_s: float = 30.0) -> int:
        """The whole invariant; ``acknowledged``: message ids of the accepted notices the
        devices saw (None: every buffered update counts as acknowledged). Returns how many
        buffered updates were accounted for exactly once."""
        self._settle(settle_s)
        self.verify()
        with self.sessions() as s, s.begin():
            if s.get_bind().dialect.name == "postgresql":
                # One view of the events and the snapshot: updates may still arrive.
                s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            buffered = q.list_events(s, self.run_id, kinds=["update.buffered"], limit=100_000)
            dropped = q.list_events(s, self.run_id, kinds=["async.stale_dropped"], limit=100_000)
            ignored = {
                e.message_id
                for e in q.list_events(s, self.run_id, kinds=["ignored"], limit=100_000)
            }
            fed = load(s, self.run_id)
            rounds = q.list_rounds(s, self.run_id)
            failed = [r.number for r in rounds if r.state == RoundState.FAILED]
            stuck = [f"round {r.number} is {r.state}" for r in rounds if r.state not in SETTLED]
        if fed is None:
            raise InvariantViolation(f"run {self.run_id} has no snapshot")
        problems: list[str] = []
        per_message = Counter(e.message_id for e in buffered if e.message_id)
        if acknowledged is not None:
            for m in sorted(set(acknowledged)):
                # A second update for a ticket already buffered is told "accepted" (the
                # first one counts for it) and recorded as ignored: not a second count.
                if per_message[m] == 0 and m in ignored:
                    continue
                if per_message[m] != 1:
                    problems.append(f"acknowledged update {m} buffered {per_message[m]} times")
        problems += [f"update {m} buffered {n} times" for m, n in per_message.items() if n > 1]
        want = Counter((e.client_id or "", str(e.detail["ref"])) for e in buffered)
        waiting = [(u.client_id, u.ref) for u in fed.buffer.updates]
        gone = [(e.client_id or "", str(e.detail["ref"])) for e in dropped]
        got = Counter(self.folded) + Counter(waiting) + Counter(gone)
        for key in sorted(set(want) | set(got)):
            if want[key] != got[key]:
                problems.append(
                    f"update {key} buffered {want[key]} times, accounted for {got[key]} "
                    "times (folded, waiting or dropped)"
                )
        problems += stuck
        problems += [f"version step {n} failed" for n in failed]
        if problems:
            raise InvariantViolation("; ".join(problems))
        return sum(want.values())

    def _settle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with session_scope(self.sessions) as s:
                busy = [r.number for r in q.list_rounds(s, self.run_id) if r.state not in SETTLED]
            if not busy:
                return
            time.sleep(0.3)


def _check_step(
    s: Session, rnd: Round, policy: str, lr: float, clip: float | None
) -> list[tuple[str, str]]:
    mv = s.get(ModelVersion, rnd.model_version_id)
    base_mv = s.get(ModelVersion, rnd.base_version_id)
    if mv is None or base_mv is None:
        raise InvariantViolation(f"step {rnd.number}: missing model version")
    rows = sorted(q.received_updates(s, rnd.id), key=lambda p: p.client_id)
    if not rows:
        raise InvariantViolation(f"step {rnd.number} closed with no recorded update")
    m = mv.metrics
    if m.get("num_updates") != len(rows) or m.get("skipped"):
        raise InvariantViolation(
            f"step {rnd.number}: {len(rows)} recorded updates, the version says "
            f"{m.get('num_updates')} (skipped {m.get('skipped')})"
        )
    base = decode(blobstore.get(s, base_mv.blob_sha)).tensors
    models: dict[int, dict[str, np.ndarray]] = {base_mv.version: base}
    total = sum(int(p.num_samples or 0) for p in rows)
    acc = {k: np.zeros(v.shape, np.float64) for k, v in base.items()}
    stalenesses: list[int] = []
    for p in rows:
        stale, delta = _delta(s, rnd, p.client_id, p.update_sha, base_mv.version, models)
        stalenesses.append(stale)
        if clip is not None:
            norm = float(np.sqrt(sum(float(np.sum(v * v)) for v in delta.values())))
            if norm > clip:
                delta = {k: v * (clip / norm) for k, v in delta.items()}
        w = weight(policy, stale) * int(p.num_samples or 0)
        for k in base:
            acc[k] += w * delta[k]
    if m.get("staleness") != stalenesses:
        raise InvariantViolation(
            f"step {rnd.number}: stalenesses {stalenesses}, the version says {m.get('staleness')}"
        )
    got = decode(blobstore.get(s, mv.blob_sha)).tensors
    for k, b0 in base.items():
        want = b0.astype(np.float64) + lr * acc[k] / total
        if not np.allclose(got[k], want, rtol=1e-5, atol=1e-6):
            err = float(np.max(np.abs(got[k] - want)))
            raise InvariantViolation(
                f"step {rnd.number}: {k} differs from the weighted buffer of its "
                f"{len(rows)} recorded updates by up to {err:.3g}"
            )
    return [(p.client_id, str(p.update_sha)) for p in rows]


def _delta(
    s: Session,
    rnd: Round,
    client_id: str,
    sha: str | None,
    step_base: int,
    models: dict[int, dict[str, np.ndarray]],
) -> tuple[int, dict[str, np.ndarray]]:
    """(staleness, float64 delta against the version it was trained on) of one update."""
    if sha is None:
        raise InvariantViolation(f"step {rnd.number}: the update of {client_id} is gone")
    d = decode(blobstore.get(s, sha))
    if d.base_version is None:
        raise InvariantViolation(f"step {rnd.number}: {client_id}'s update names no base")
    b = int(d.base_version)
    tensors = {k: v.astype(np.float64) for k, v in d.tensors.items()}
    if d.delta:
        return step_base - b, tensors
    if b not in models:
        own = q.get_model_version(s, rnd.run_id, b)
        if own is None:
            raise InvariantViolation(f"step {rnd.number}: no version {b}")
        models[b] = decode(blobstore.get(s, own.blob_sha)).tensors
    return step_base - b, {k: v - models[b][k].astype(np.float64) for k, v in tensors.items()}
