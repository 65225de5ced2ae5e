"""A split run's model as one spec that the devices, the edge and the evaluator build alike.

``{"name", "num_classes", "input_shape", "seed", "config"}``: built with ``seed`` on every
side, so head, body and tail start as parts of one model. ``SPLIT_MODEL_CONFIG`` is the
config a model name gets by default: an MLP needs two hidden layers to be cut, and the
default MLP has one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from learning.data import load_dataset
from learning.models import build_model
from learning.params import Arrays, to_numpy
from learning.split.cuts import split_model

SPLIT_MODEL_CONFIG: dict[str, dict[str, Any]] = {"mlp": {"hidden": [128, 64]}}


def model_config(model: str) -> dict[str, Any]:
    """The config ``model`` is built with in a split run (a copy)."""
    return {k: list(v) if isinstance(v, list) else v
            for k, v in SPLIT_MODEL_CONFIG.get(model, {}).items()}  # fmt: skip


def model_spec(dataset: str, model: str, seed: int = 0) -> dict[str, Any]:
    data = load_dataset(dataset, seed=seed)
    return {
        "name": model,
        "num_classes": data.num_classes,
        "input_shape": list(data.input_shape),
        "seed": seed,
        "config": model_config(model),
    }


def build_full(spec: Mapping[str, Any]) -> nn.Module:
    """The whole model of ``spec``, as the seed builds it."""
    return build_model(
        str(spec["name"]),
        num_classes=int(spec["num_classes"]),
        input_shape=tuple(spec["input_shape"]),
        seed=int(spec.get("seed", 0)),
        **dict(spec.get("config") or {}),
    )


def device_part(spec: Mapping[str, Any]) -> Arrays:
    """A split run's version 0: the head and tail of the model ``spec`` builds."""
    split = split_model(build_full(spec))
    names = set(split.state_names("head", "tail"))
    return {k: v for k, v in to_numpy(split.model).items() if k in names}
