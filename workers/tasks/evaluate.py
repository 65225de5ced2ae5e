"""``fedmq.evaluate``: a model version on the run's held-out test set -> loss and accuracy.

Which model and which test set come from the run's config (``config["model"]`` and
``config["dataset"]``, each a name or ``{"name": ..., ...}``). Until ``learning`` has its
model and dataset registry, this module keeps a small one of its own:

- models: ``mlp``: a stack of linear layers (``*.weight`` (out, in) + ``*.bias``, in the
  blob's order) with ReLU between them and softmax cross-entropy at the end, the layout of
  a torch ``nn.Sequential`` of ``Linear``/``ReLU``; evaluated in numpy.
- datasets: ``digits``: scikit-learn's 8x8 digits (pixels / 16), a seeded split holding
  out ``test_fraction`` (default 0.2) with ``seed`` (default 0). Needs scikit-learn, which
  is not a dependency of fedmq: without it the task reports ``skipped``.

``register_model`` / ``register_dataset`` add more (the tests register a synthetic set).
An unknown name is not an error: the task returns ``{"skipped": reason}`` and records an
``evaluate.skipped`` event, so a run without an evaluator still completes its rounds.
Metrics are merged into the model version's and the round's metrics; running the task
twice stores the same values twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from db import blobstore
from db import queries as q
from db.engine import session_scope
from db.models import ModelVersion
from protocol.codec import CodecError, decode
from workers.config import WorkerConfig
from workers.tasks.common import EvaluationError, sessions

DONE = "evaluate.done"
SKIPPED = "evaluate.skipped"

TestSet = tuple[np.ndarray, np.ndarray]
DatasetLoader = Callable[[Mapping[str, Any]], TestSet]
ModelEvaluator = Callable[[Mapping[str, np.ndarray], np.ndarray, np.ndarray], dict[str, float]]

_MODELS: dict[str, ModelEvaluator] = {}
_DATASETS: dict[str, DatasetLoader] = {}


class Unavailable(Exception):
    """An evaluator or test set that cannot be used here (unknown, or a missing package)."""


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


def mlp_metrics(
    weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> dict[str, float]:
    """Loss and accuracy of an MLP given as its linear layers' weights and biases."""
    layers = [(n, w) for n, w in weights.items() if n.endswith("weight") and w.ndim == 2]
    if not layers:
        raise EvaluationError("mlp: the model has no 2-D '*.weight' tensor")
    h = np.asarray(x, dtype=np.float64)
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


def digits_test_set(params: Mapping[str, Any]) -> TestSet:
    try:
        from sklearn.datasets import load_digits  # type: ignore[import-not-found]
    except ImportError:
        raise Unavailable("dataset 'digits' needs scikit-learn, which is not installed") from None
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(int(params.get("seed", 0))).permutation(len(y))
    n_test = max(1, round(len(y) * float(params.get("test_fraction", 0.2))))
    test = order[:n_test]
    return (x[test] / 16.0).astype(np.float32), y[test]


register_model("mlp", mlp_metrics)
register_dataset("digits", digits_test_set)


def evaluate_weights(
    weights: Mapping[str, np.ndarray], run_config: Mapping[str, Any]
) -> dict[str, float]:
    """Metrics of ``weights`` on the run's test set; raises Unavailable when it cannot."""
    model, _ = _spec(run_config.get("model"))
    dataset, data_params = _spec(run_config.get("dataset"))
    evaluator = _MODELS.get(model or "")
    if evaluator is None:
        raise Unavailable(f"no evaluator for model {model!r}")
    loader = _DATASETS.get(dataset or "")
    if loader is None:
        raise Unavailable(f"no test set for dataset {dataset!r}")
    x, y = loader(data_params)
    return evaluator(weights, x, y)


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
