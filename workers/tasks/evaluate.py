"""``fedmq.evaluate``: a model version on the run's held-out test set -> loss and accuracy.

Which model and which test set come from the run's config (``config["model"]`` and
``config["dataset"]``, each a name or ``{"name": ..., ...}``). The registry is
``learning``'s:

- test sets: ``learning.data.load_dataset(name, **params)``'s test part (digits: the
  stratified 80/20 split with ``seed`` 0 that devices and the replica use too; cifar10 from
  its local folder ``root``). Loaded sets are cached per (name, params).
- models: every ``learning.models`` name, built for the dataset (its classes and input
  shape) with the model entry's params, loaded with the weights and run in torch. A
  learning model needs a known dataset to be built: without one it has no evaluator.
- ``mlp`` keeps a numpy evaluator that needs no config (model params are ignored): any
  stack of linear layers (``*.weight`` (out, in) + ``*.bias``, in natural name order,
  ``net.2`` before ``net.10``) with ReLU between them, the layout of
  ``learning.models.MLP`` and of any ``nn.Sequential`` of ``Linear``/``ReLU``.

A split run (``config["split"]``, ``orchestrator.edge``) is evaluated as its composed model:
the version's head and tail with the body its round's edge session stored and named in
the version (``workers.edge.bodies``; the task waits up to ``split.body_wait_s`` for it,
since the session names it once the version exists), the model built from
``config["split"]["model"]`` and run on the dataset's test set.

``register_model`` / ``register_dataset`` add or override names here (the tests register a
synthetic set). An unknown name is not an error: the task returns ``{"skipped": reason}``
and records an ``evaluate.skipped`` event, so a run without an evaluator still completes
its rounds. Metrics are merged into the model version's and the round's metrics; running
the task twice stores the same values twice.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from db import blobstore
from db import queries as q
from db.engine import session_scope
from db.models import ModelVersion
from learning.data import has_dataset, load_dataset
from learning.evaluate import evaluate
from learning.models import build_model, model_names
from learning.params import load_numpy, to_numpy
from learning.split.spec import build_full
from protocol.codec import CodecError, decode
from workers.config import WorkerConfig
from workers.edge.bodies import body_ref
from workers.tasks.common import EvaluationError, sessions

DONE = "evaluate.done"
SKIPPED = "evaluate.skipped"

TestSet = tuple[np.ndarray, np.ndarray]
DatasetLoader = Callable[[Mapping[str, Any]], TestSet]
ModelEvaluator = Callable[[Mapping[str, np.ndarray], np.ndarray, np.ndarray], dict[str, float]]

# How long a split run's evaluation waits for its round's edge body, and how often it looks.
BODY_WAIT_S = 120.0
BODY_POLL_S = 0.1

_MODELS: dict[str, ModelEvaluator] = {}
_DATASETS: dict[str, DatasetLoader] = {}


class Unavailable(Exception):
    """An evaluator or test set that cannot be used here (unknown, or a missing package)."""


@dataclass(frozen=True)
class _TestData:
    x: np.ndarray
    y: np.ndarray
    num_classes: int


def register_model(name: str, evaluator: ModelEvaluator) -> None:
    _MODELS[name] = evaluator


def register_dataset(name: str, loader: DatasetLoader) -> None:
    _DATASETS[name] = loader


def _spec(value: Any) -> tuple[str | None, dict[str, Any]]:
    if isinstance(value, Mapping):
        params = dict(value)
        return params.pop("name", None), params
    return (value if isinstance(value, str) else None), {}


def softmax_metrics(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``logits`` (n, classes) against labels ``y``."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    y = y.astype(np.int64)
    loss = float(-log_p[np.arange(len(y)), y].mean())
    accuracy = float((logits.argmax(axis=1) == y).mean())
    return {"loss": loss, "accuracy": accuracy, "num_samples": float(len(y))}


def _natural(name: str) -> list[tuple[int, str]]:
    """Sort key putting ``net.2`` before ``net.10`` (and ``fc1`` before ``fc2``)."""
    return [(int(part), "") if part.isdigit() else (-1, part) for part in re.split(r"(\d+)", name)]


def mlp_metrics(
    weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> dict[str, float]:
    """Loss and accuracy of an MLP given as its linear layers' weights and biases."""
    layers = [(n, w) for n, w in weights.items() if n.endswith("weight") and w.ndim == 2]
    layers.sort(key=lambda item: _natural(item[0]))
    if not layers:
        raise EvaluationError("mlp: the model has no 2-D '*.weight' tensor")
    h = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    for i, (name, w) in enumerate(layers):
        if h.shape[1] != w.shape[1]:
            raise EvaluationError(f"mlp: {name} takes {w.shape[1]} inputs, got {h.shape[1]}")
        h = h @ w.astype(np.float64).T
        bias = weights.get(name[: -len("weight")] + "bias")
        if bias is not None:
            h = h + bias.astype(np.float64)
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return softmax_metrics(h, y)


register_model("mlp", mlp_metrics)


@lru_cache(maxsize=4)
def _learning_test_set(name: str, params_json: str) -> _TestData:
    try:
        data = load_dataset(name, **json.loads(params_json))
    except (ImportError, OSError, TypeError, ValueError) as e:
        raise Unavailable(f"dataset {name!r}: {e}") from None
    return _TestData(data.x_test, data.y_test, data.num_classes)


def _test_set(name: str | None, params: Mapping[str, Any]) -> _TestData | None:
    if name in _DATASETS:
        x, y = _DATASETS[name](params)
        return _TestData(x, y, int(np.max(y)) + 1 if len(y) else 0)
    if name is not None and has_dataset(name):
        return _learning_test_set(name, json.dumps(dict(params), sort_keys=True))
    return None


def _torch_evaluator(name: str, params: Mapping[str, Any], test: _TestData) -> ModelEvaluator:
    def run(weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        try:
            model = build_model(
                name,
                **{"num_classes": test.num_classes, "input_shape": x.shape[1:], **params},
            )
            load_numpy(model, weights)
        except (KeyError, TypeError, ValueError) as e:
            raise EvaluationError(f"{name}: {e}") from e
        loss, accuracy = evaluate(model, x, y)
        return {"loss": loss, "accuracy": accuracy, "num_samples": float(len(y))}

    return run


def evaluate_weights(
    weights: Mapping[str, np.ndarray], run_config: Mapping[str, Any]
) -> dict[str, float]:
    """Metrics of ``weights`` on the run's test set; raises Unavailable when it cannot."""
    model, model_params = _spec(run_config.get("model"))
    dataset, data_params = _spec(run_config.get("dataset"))
    evaluator = _MODELS.get(model or "")
    known_to_learning = model in model_names()
    if evaluator is None and not known_to_learning:
        raise Unavailable(f"no evaluator for model {model!r}")
    test = _test_set(dataset, data_params)
    if evaluator is None and test is not None and model is not None:
        evaluator = _torch_evaluator(model, model_params, test)
    if evaluator is None:  # a learning model is built for a dataset: none known here
        raise Unavailable(f"no evaluator for model {model!r}")
    if test is None:
        raise Unavailable(f"no test set for dataset {dataset!r}")
    return evaluator(weights, test.x, test.y)


def with_split_body(
    factory: sessionmaker[Session],
    config: WorkerConfig,
    run_id: str,
    model_version: int,
    parts: Mapping[str, np.ndarray],
    run_config: Mapping[str, Any],
) -> dict[str, np.ndarray]:
    """The version's head and tail (``parts``) with the body named in its metrics, waited
    for; EvaluationError when none is named in time (the edge session failed or is gone)."""
    wait_s = float(run_config["split"].get("body_wait_s", BODY_WAIT_S))
    deadline = time.monotonic() + wait_s
    while True:
        with session_scope(factory) as s:
            mv = q.get_model_version(s, run_id, model_version)
            sha = body_ref(mv.metrics if mv is not None else None)
            blob = blobstore.get(s, sha) if sha is not None else None
        if blob is not None:
            break
        if time.monotonic() >= deadline:
            raise EvaluationError(
                f"version {model_version} of split run {run_id} names no edge body after "
                f"{wait_s:g} s (its round's edge session failed or never ran)"
            )
        time.sleep(BODY_POLL_S)
    try:
        body = decode(blob, limits=config.decode_limits).tensors
    except CodecError as e:
        raise EvaluationError(f"the body of version {model_version}: {e}") from e
    return {**body, **parts}


def evaluate_split(
    weights: Mapping[str, np.ndarray], run_config: Mapping[str, Any]
) -> dict[str, float]:
    """Metrics of a split run's composed model (every tensor of the whole model)."""
    spec = dict(run_config["split"].get("model") or {})
    dataset, data_params = _spec(run_config.get("dataset"))
    test = _test_set(dataset, data_params)
    if test is None:
        raise Unavailable(f"no test set for dataset {dataset!r}")
    try:
        model = build_full(
            {"num_classes": test.num_classes, "input_shape": test.x.shape[1:], **spec}
        )
        # What neither side holds (none for the models cut today) stays as the seed built it,
        # as on the devices and the edge; a tensor of the wrong name or shape is refused.
        load_numpy(model, {**to_numpy(model), **weights})
    except (KeyError, TypeError, ValueError) as e:
        raise EvaluationError(f"split model {spec.get('name')!r}: {e}") from e
    loss, accuracy = evaluate(model, test.x, test.y)
    return {"loss": loss, "accuracy": accuracy, "num_samples": float(len(test.y))}


def evaluate_version(
    config: WorkerConfig, run_id: str, round_number: int, model_version: int
) -> dict[str, Any]:
    """Evaluate version ``model_version`` of ``run_id``; store and return its metrics.

    Returns ``{"model_version", "loss", "accuracy", "num_samples"}``, or
    ``{"model_version", "skipped": reason}`` when the run has no usable evaluator.
    """
    factory = sessions(config.database_url)
    with session_scope(factory) as s:
        run = q.get_run(s, run_id)
        mv = q.get_model_version(s, run_id, model_version)
        if run is None or mv is None:
            raise EvaluationError(f"run {run_id!r} has no model version {model_version}")
        run_config, blob = dict(run.config), blobstore.get(s, mv.blob_sha)
    try:
        decoded = decode(blob, limits=config.decode_limits)
    except CodecError as e:
        raise EvaluationError(f"model version {model_version}: {e}") from e
    del blob
    try:
        if isinstance(run_config.get("split"), Mapping):
            weights = with_split_body(factory, config, run_id, model_version, decoded.tensors,
                                      run_config)  # fmt: skip
            metrics = evaluate_split(weights, run_config)
        else:
            metrics = evaluate_weights(decoded.tensors, run_config)
    except Unavailable as e:
        with session_scope(factory) as s:
            q.record_event(s, SKIPPED, run_id=run_id, round=round_number, detail={"reason": str(e)})
        return {"model_version": model_version, "skipped": str(e)}
    with session_scope(factory) as s:
        _merge_version_metrics(s, run_id, model_version, metrics)
        rnd = q.get_round(s, run_id, round_number)
        if rnd is not None:
            q.set_round_metrics(s, rnd.id, {**metrics, "model_version": model_version})
        q.record_event(
            s,
            DONE,
            run_id=run_id,
            round=round_number,
            detail={"model_version": model_version, **metrics},
        )
    return {"model_version": model_version, **metrics}


def _merge_version_metrics(
    s: Session, run_id: str, version: int, metrics: Mapping[str, Any]
) -> None:
    # Like db.queries.set_round_metrics: lock the row, merge, let the session flush it.
    mv = q.get_model_version(s, run_id, version)
    assert mv is not None
    mv = s.get_one(ModelVersion, mv.id, with_for_update=True, populate_existing=True)
    mv.metrics = {**mv.metrics, **metrics}
