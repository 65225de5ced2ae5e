"""The body of the ``fedmq.edge.session`` task: build the body, serve one session.

The spec (JSON, as Celery carries it)::

    {"session_id": "s1", "run_id": "r1",
     "model": {"name": "vit_tiny", "num_classes": 10, "input_shape": [1, 8, 8],
               "seed": 0, "config": {...}},
     "train": {"lr": 0.05, "momentum": 0.0, "weight_decay": 0.0},
     "edge": {"wait_bound_s": 0.002, "expected_devices": 2, "idle_timeout_s": 60,
              "request_timeout_s": 30, "max_session_s": 3600, "overlap": true,
              "autocast": false},
     "bus_url": null, "return_body": false,
     "round": null, "attempt": 1}

With ``round`` (a number; ``run_id`` required) the session is that round attempt of a
SplitFed run under the orchestrator, which sends this task when the attempt opens
(``orchestrator.edge``): its id defaults to ``round_session_id(run_id, round, attempt)``; it
is claimed once (``workers.edge.rounds``: a second delivery, or one that comes after the
attempt ended, returns ``{"skipped": reason}``); it ends early when the attempt does; the
body starts from the one named in the round's base version, and after the session it is
stored and named in the version the round makes (``workers.edge.bodies``).

The body starts from the model built with ``seed``, as the devices build theirs, so head,
body and tail start from one model. ``bus_url`` defaults to the worker's broker. The
result holds the session's figures and, with ``return_body``, the trained body's state
as a base64 fp32 codec blob (named as in the whole model's state dict).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import queries as q
from db.engine import session_scope
from learning.models import build_model
from learning.params import load_numpy, to_numpy
from learning.split import split_model
from protocol.bus import connect
from protocol.codec import Encoding, encode
from protocol.split import round_session_id
from workers.config import WorkerConfig
from workers.edge import rounds
from workers.edge.bodies import load_body, store_body
from workers.edge.engine import EdgeEngine, EngineOptions
from workers.edge.session import Authenticate, EdgeSession, EdgeSessionConfig
from workers.pipeline.device import resolve_device
from workers.tasks.common import sessions

log = logging.getLogger(__name__)

_EDGE_KEYS = {
    "wait_bound_s",
    "expected_devices",
    "idle_timeout_s",
    "request_timeout_s",
    "max_session_s",
    "max_batch_rows",
}
_ENGINE_KEYS = {"overlap", "autocast"}


def build_engine(spec: dict[str, Any], device: str) -> tuple[EdgeEngine, dict[str, str]]:
    """The engine for ``spec`` and the whole-model state name of each body tensor."""
    m = spec["model"]
    model = build_model(
        m["name"],
        num_classes=int(m.get("num_classes", 10)),
        input_shape=m.get("input_shape"),
        seed=int(m.get("seed", 0)),
        **dict(m.get("config", {})),
    )
    split = split_model(model)
    edge, train = dict(spec.get("edge", {})), dict(spec.get("train", {}))
    options = EngineOptions(
        lr=float(train.get("lr", 0.05)),
        momentum=float(train.get("momentum", 0.0)),
        weight_decay=float(train.get("weight_decay", 0.0)),
        **{k: bool(v) for k, v in edge.items() if k in _ENGINE_KEYS},
    )
    prefix = {id(t): name for name, t in model.state_dict(keep_vars=True).items()}
    names = {local: prefix[id(t)] for local, t in split.body.state_dict(keep_vars=True).items()}
    return EdgeEngine(split.body, resolve_device(device), options), names


def body_state(engine: EdgeEngine, names: dict[str, str]) -> dict[str, Any]:
    return {names[k]: v for k, v in to_numpy(engine.body).items()}


def load_body_state(engine: EdgeEngine, names: dict[str, str], saved: dict[str, Any]) -> None:
    """Load a stored body (whole-model names, as ``body_state`` writes them)."""
    inverse = {whole: local for local, whole in names.items()}
    current = to_numpy(engine.body)
    load_numpy(
        engine.body, {**current, **{inverse[k]: v for k, v in saved.items() if k in inverse}}
    )
    engine.body.to(engine.device)


def client_check(factory: sessionmaker[Session], run_id: str) -> Authenticate:
    """Requests of run ``run_id``'s registered clients, with their tokens, pass."""

    def check(request_run: str, client_id: str, token: str | None) -> str | None:
        refused = f"unknown client or bad token for {client_id}"
        if request_run != run_id or token is None:
            return refused
        with session_scope(factory) as s:
            client = q.get_client(s, client_id)
            ok = (
                client is not None
                and client.run_id == run_id
                and hmac.compare_digest(client.token_hash, q.hash_token(token))
            )
        return None if ok else refused

    return check


def run_edge_session(config: WorkerConfig, spec: dict[str, Any]) -> dict[str, Any]:
    """Serve the session ``spec`` describes until it ends; returns its figures."""
    unknown = set(spec.get("edge", {})) - _EDGE_KEYS - _ENGINE_KEYS
    if unknown:
        raise ValueError(f"unknown edge settings {sorted(unknown)}")
    round_number = spec.get("round")
    run_id = str(spec.get("run_id", ""))
    attempt = int(spec.get("attempt") or 1)
    session_id = spec.get("session_id")
    if not session_id:
        if round_number is None:
            raise ValueError("an edge session spec needs a session_id or a round")
        session_id = round_session_id(run_id, int(round_number), attempt)
    if round_number is not None:
        refused = rounds.claim(
            sessions(config.database_url), run_id, int(round_number), attempt, str(session_id)
        )
        if refused is not None:
            log.info("edge session %s not started: %s", session_id, refused)
            return {"session_id": str(session_id), "skipped": refused}
    engine, names = build_engine(spec, config.device)
    saved = None
    if round_number is not None:
        saved = load_body(
            sessions(config.database_url), run_id, int(round_number), config.decode_limits
        )
        if saved is not None:
            load_body_state(engine, names, saved)
    edge = {k: v for k, v in spec.get("edge", {}).items() if k in _EDGE_KEYS}
    session_config = EdgeSessionConfig(
        session_id=str(session_id), limits=config.decode_limits, **edge
    )
    url = spec.get("bus_url") or config.broker_url
    # A session serving a run's round takes only that run's clients, by their tokens.
    check = None if round_number is None else client_check(sessions(config.database_url), run_id)
    bus = connect(url)
    try:
        log.info("edge session %s on %s", session_config.session_id, engine.device)
        session = EdgeSession(bus, engine, session_config, authenticate=check)
        if round_number is None:
            result = session.serve()
        else:
            factory = sessions(config.database_url)
            with rounds.AttemptWatch(factory, run_id, int(round_number), attempt, session.stop):
                result = session.serve()
    finally:
        if not url.startswith("memory:"):  # a named in-process bus belongs to the process
            bus.close()
    blob = encode(body_state(engine, names), Encoding.FP32)
    result.update(
        session_id=session_config.session_id,
        device=str(engine.device),
        body_sha256=hashlib.sha256(blob).hexdigest(),
        resumed=saved is not None,
    )
    if round_number is not None:
        stored = store_body(
            sessions(config.database_url),
            run_id,
            int(round_number),
            blob,
            attempt=attempt,
            wait_s=float(spec.get("version_wait_s", 120.0)),
        )
        result["body_model_version"] = stored["model_version"]
        result.update(round=int(round_number), attempt=attempt)
        rounds.record_done(sessions(config.database_url), run_id, int(round_number), result)
    if spec.get("return_body"):
        result["body_blob_b64"] = base64.b64encode(blob).decode()
    return result
