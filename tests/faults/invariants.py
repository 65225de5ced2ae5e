"""The one invariant check every fault scenario ends with.

1. Nothing acknowledged is lost or counted twice: every update a device saw acknowledged
   (an ``update.accepted`` notice on its queue, correlated by the update's message id) is
   in exactly one participation row of the run, in state ``update``; and no client has two
   counted rows for one round.
2. Every closed round's global model is the aggregate of exactly the updates recorded for
   it: FedAvg recomputed here, independently of the worker (its own decode of the stored
   blobs, float64, ``base + sum(n_k * delta_k) / sum(n_k)``), equals the stored version.
   A secure round (SecAgg+): the material the version names unmasks exactly the recorded
   updates (the same clients, the same blobs), and base + their dequantised ring sum is
   the stored version (when central DP noised it, only the survivors are checked).
3. No round is stuck: each is done or failed, or open with its deadline still ahead.

Rounds are verified once, when first seen closed, and remembered: the orchestrator prunes
update blobs of old rounds (``keep_update_rounds``), so long scenarios call ``verify``
after each round rather than only at the end.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db import queries as q
from db.engine import session_scope
from db.models import ModelVersion, Participation, ParticipationState, Round, RoundState
from protocol.codec import decode
from protocol.secagg import dequantize_mean, layout_of, unflatten, unmask_sum
from protocol.secagg.blob import MASKED

CLOSED = {RoundState.EVALUATING, RoundState.DONE}
SETTLED = {RoundState.DONE, RoundState.FAILED}


class InvariantViolation(AssertionError):
    pass


@dataclass
class Invariants:
    sessions: sessionmaker[Session]
    run_id: str
    verified: set[int] = field(default_factory=set)  # round numbers already recomputed
    stored: int = 0  # counted updates over the verified rounds

    # --- 2: the global models -------------------------------------------------------------

    def verify(self) -> None:
        """Recompute every closed round not verified yet."""
        with session_scope(self.sessions) as s:
            for rnd in q.list_rounds(s, self.run_id):
                if rnd.number in self.verified or rnd.model_version_id is None:
                    continue
                if rnd.state not in CLOSED:
                    continue
                self.stored += _check_round(s, rnd)
                self.verified.add(rnd.number)

    # --- 1 and 3 --------------------------------------------------------------------------

    def check(self, acknowledged: Iterable[str], settle_s: float = 30.0) -> int:
        """The whole invariant; ``acknowledged``: message ids of accepted notices seen (a
        notice may arrive twice: the outbox publishes at least once). Returns how many
        distinct acknowledged updates were found, each in exactly one row."""
        self._settle(settle_s)
        self.verify()
        acked = sorted(set(acknowledged))
        with session_scope(self.sessions) as s:
            rows = s.execute(
                select(Participation.round_id, Participation.client_id, Participation.message_id)
                .join(Round, Round.id == Participation.round_id)
                .where(Round.run_id == self.run_id)
                .where(Participation.state == ParticipationState.UPDATE)
            ).all()
            rounds = q.list_rounds(s, self.run_id)
            now = datetime.now(UTC)
            stuck = [
                f"round {r.number} is {r.state} (deadline {r.deadline})"
                for r in rounds
                if r.state not in SETTLED
                and not (r.state == RoundState.OPEN and r.deadline is not None and r.deadline > now)
            ]
        per_message = Counter(m for _, _, m in rows)
        per_client_round = Counter((r, c) for r, c, _ in rows)
        problems = [f"acknowledged update {m} is in {per_message[m]} rows" for m in acked]
        problems = [p for p, m in zip(problems, acked, strict=True) if per_message[m] != 1]
        problems += [f"{k} counted {n} times" for k, n in per_client_round.items() if n > 1]
        problems += stuck
        unverified = {r.number for r in rounds if r.state in CLOSED} - self.verified
        problems += [f"closed round {n} was never recomputed" for n in sorted(unverified)]
        if problems:
            raise InvariantViolation("; ".join(problems))
        return len(acked)

    def _settle(self, timeout: float) -> None:
        """Wait (bounded) for rounds in aggregating/evaluating to finish: in flight is not
        stuck, but past ``timeout`` it is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with session_scope(self.sessions) as s:
                busy = [
                    r.number
                    for r in q.list_rounds(s, self.run_id)
                    if r.state in (RoundState.AGGREGATING, RoundState.EVALUATING)
                ]
            if not busy:
                return
            time.sleep(0.3)


def _tensors(s: Session, sha: str) -> tuple[dict[str, np.ndarray], bool]:
    d = decode(blobstore.get(s, sha))
    return d.tensors, d.delta


def _check_round(s: Session, rnd: Round) -> int:
    mv = s.get(ModelVersion, rnd.model_version_id)
    base_mv = s.get(ModelVersion, rnd.base_version_id)
    if mv is None or base_mv is None:
        raise InvariantViolation(f"round {rnd.number}: missing model version")
    rows = q.received_updates(s, rnd.id)
    if not rows:
        raise InvariantViolation(f"round {rnd.number} closed with no recorded update")
    if mv.metrics.get("fold") == "secagg":
        return _check_secure_round(s, rnd, mv, base_mv, rows)
    if mv.metrics.get("num_updates") != len(rows) or mv.metrics.get("skipped"):
        raise InvariantViolation(
            f"round {rnd.number}: {len(rows)} recorded updates, the version says "
            f"{mv.metrics.get('num_updates')} (skipped {mv.metrics.get('skipped')})"
        )
    base, _ = _tensors(s, base_mv.blob_sha)
    total = sum(int(p.num_samples or 0) for p in rows)
    acc = {k: np.zeros(v.shape, np.float64) for k, v in base.items()}
    for p in rows:
        if p.update_sha is None:
            raise InvariantViolation(f"round {rnd.number}: the update of {p.client_id} is gone")
        tensors, is_delta = _tensors(s, p.update_sha)
        for k, b in base.items():
            delta = tensors[k].astype(np.float64)
            if not is_delta:
                delta = delta - b.astype(np.float64)
            acc[k] += int(p.num_samples or 0) * delta
    got, _ = _tensors(s, mv.blob_sha)
    for k, b in base.items():
        want = b.astype(np.float64) + acc[k] / total
        if not np.allclose(got[k], want, rtol=1e-5, atol=1e-6):
            err = float(np.max(np.abs(got[k] - want)))
            raise InvariantViolation(
                f"round {rnd.number}: {k} differs from FedAvg of its {len(rows)} recorded "
                f"updates by up to {err:.3g}"
            )
    return len(rows)


def unmask_from_material(masked: dict[str, Any], material: dict[str, Any]) -> Any:
    """The survivors' ring sum, unmasked from their masked vectors and the material blob a
    version names (keys, sharers, revealed shares, graph), without the worker's code."""
    keys = material["keys"]
    return unmask_sum(
        masked,
        {c: (bytes.fromhex(k[0]), bytes.fromhex(k[1])) for c, k in keys.items()},
        material["sharers"],
        {
            rep: {o: (ks[0], bytes.fromhex(ks[1])) for o, ks in sh.items()}
            for rep, sh in material["revealed"].items()
        },
        graph_seed=bytes.fromhex(material["graph_seed"]),
        degree=int(material["degree"]),
        threshold=int(material["threshold"]),
        context=str(material["context"]).encode(),
    )


def _check_secure_round(
    s: Session, rnd: Round, mv: ModelVersion, base_mv: ModelVersion, rows: list[Participation]
) -> int:
    """A secure round: unmasked again here from the stored masked blobs and the material."""
    info = mv.metrics["secagg"]
    material = json.loads(blobstore.get(s, info["material"]))
    recorded = {p.client_id: p.update_sha for p in rows}
    if recorded != material["masked"] or mv.metrics.get("num_updates") != len(rows):
        raise InvariantViolation(
            f"round {rnd.number}: recorded updates {sorted(recorded)} are not the survivors "
            f"{sorted(material['masked'])} the version was unmasked from"
        )
    keys = material["keys"]
    for p in rows:
        if int(keys[p.client_id][2]) != int(p.num_samples or 0):
            raise InvariantViolation(
                f"round {rnd.number}: {p.client_id} recorded {p.num_samples} samples, "
                f"announced {keys[p.client_id][2]} with its keys"
            )
    masked = {}
    for cid, sha in recorded.items():
        tensors = decode(blobstore.get(s, str(sha))).tensors
        if list(tensors) != [MASKED]:
            raise InvariantViolation(f"round {rnd.number}: {cid}'s stored update is not masked")
        masked[cid] = tensors[MASKED]
    total = unmask_from_material(masked, material)
    if (mv.metrics.get("privacy") or {}).get("noise_std"):
        return len(rows)  # noised once after unmasking: the sum itself is not released
    base, _ = _tensors(s, base_mv.blob_sha)
    samples = sum(int(p.num_samples or 0) for p in rows)
    mean = unflatten(
        dequantize_mean(total, samples, int(material["scale"])).astype(np.float64),
        layout_of({k: v for k, v in base.items() if v.dtype.kind == "f"}),
    )
    got, _ = _tensors(s, mv.blob_sha)
    for k, d in mean.items():
        want = base[k].astype(np.float64) + d
        if not np.allclose(got[k], want, rtol=1e-5, atol=1e-6):
            raise InvariantViolation(
                f"round {rnd.number}: {k} differs from the unmasked sum of its survivors"
            )
    return len(rows)
