"""The edge body of a SplitFed run, kept durably between rounds.

Under the orchestrator a run's global model is the devices' part (head + tail); the body
lives on the edge. After a round's session the body goes to the blob store (an fp32 codec
blob, ``BlobKind.MODEL`` so that retention keeps it) and is named in the metrics of the
model version that round produced, ``split_body: {"sha256", "round"}`` — the way the
aggregate task names its ``server_state``. A round's session starts from the body named
in its base version, so a restarted edge resumes where the last finished round left it,
and a failed round's body is dropped together with its devices' updates.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db import queries as q
from db.engine import session_scope
from db.models import ModelVersion
from db.models.enums import BlobKind, RoundState
from protocol.codec import DecodeLimits, decode

log = logging.getLogger(__name__)

BODY_KEY = "split_body"


def body_ref(metrics: dict[str, Any] | None) -> str | None:
    """The body blob's SHA-256 named in a model version's metrics, if any."""
    ref = (metrics or {}).get(BODY_KEY)
    return str(ref["sha256"]) if isinstance(ref, dict) and "sha256" in ref else None


def load_body(
    factory: sessionmaker[Session], run_id: str, round_number: int, limits: DecodeLimits
) -> dict[str, np.ndarray] | None:
    """The body round ``round_number`` starts from (its base version's), or None when the
    base version names none (version 0: the body built from the run's seed)."""
    with session_scope(factory) as s:
        rnd = q.get_round(s, run_id, round_number)
        base = (
            q.get_model_version_by_id(s, rnd.base_version_id)
            if rnd and rnd.base_version_id
            else None
        )
        sha = body_ref(base.metrics) if base is not None else None
        if sha is None:
            return None
        blob = blobstore.get(s, sha)
    return decode(blob, limits=limits).tensors


def store_body(
    factory: sessionmaker[Session],
    run_id: str,
    round_number: int,
    blob: bytes,
    *,
    attempt: int | None = None,
    wait_s: float = 120.0,
    poll_s: float = 0.05,
) -> dict[str, Any]:
    """Store the body trained in round ``round_number`` and name it in the model version
    the round produces, once the aggregate task has made it (the devices send their
    updates after they leave the session, so the version comes a little later). Returns
    ``{"sha256", "model_version"}``; ``model_version`` is None when the round failed, its
    ``attempt`` was superseded by a retry (whose own session trains the body the version
    gets), or it made no version within ``wait_s`` (the blob stays, unnamed)."""
    with session_scope(factory) as s:
        sha = blobstore.put(s, blob, BlobKind.MODEL)
    deadline = time.monotonic() + wait_s
    while True:
        with session_scope(factory) as s:
            rnd = q.get_round(s, run_id, round_number)
            superseded = rnd is not None and attempt is not None and rnd.attempt != attempt
            if rnd is not None and rnd.model_version_id is not None and not superseded:
                # Locked and merged, as the evaluate task merges its metrics.
                mv = s.get_one(
                    ModelVersion, rnd.model_version_id, with_for_update=True, populate_existing=True
                )
                mv.metrics = {**mv.metrics, BODY_KEY: {"sha256": sha, "round": round_number}}
                return {"sha256": sha, "model_version": mv.version}
            failed = rnd is None or rnd.state == RoundState.FAILED or superseded
        if failed or time.monotonic() >= deadline:
            log.warning("run %s round %s: body %s named in no version", run_id, round_number, sha)
            return {"sha256": sha, "model_version": None}
        time.sleep(poll_s)
