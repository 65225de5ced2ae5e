"""Models by name: ``build_model("mlp", num_classes=10, input_shape=(64,), hidden=(256,))``.

``num_classes`` and ``input_shape`` (one sample's shape, as a dataset reports it) fill the
config fields they determine; every other keyword is a field of the model's config
dataclass. ``seed`` seeds torch's CPU generator for the construction only (the caller's
global generator state is left as it was), so the same seed gives the same initial weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from learning.models.cnn import CNN, CNNConfig
from learning.models.mlp import MLP, MLPConfig
from learning.models.resnet import ResNet, ResNetConfig
from learning.models.vit import ViT, ViTConfig

Shape = tuple[int, ...]


def _image(input_shape: Shape) -> tuple[int, int]:
    """(channels, side) of a (C, H, W) shape, or of a flat square single-channel one."""
    if len(input_shape) == 3 and input_shape[1] == input_shape[2]:
        return input_shape[0], input_shape[1]
    side = math.isqrt(math.prod(input_shape))
    if len(input_shape) == 1 and side * side == input_shape[0]:
        return 1, side
    raise ValueError(f"expected a square image shape (C, H, H), got {input_shape}")


def _config(cls: type, derived: dict[str, Any], cfg: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(cfg) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    values = {**derived, **cfg}
    for key, value in values.items():  # JSON run configs carry lists, configs want tuples
        if isinstance(value, list):
            values[key] = tuple(value)
    return cls(**values)


def _mlp(num_classes: int, shape: Shape, cfg: dict[str, Any]) -> nn.Module:
    return MLP(
        _config(MLPConfig, {"in_features": math.prod(shape), "num_classes": num_classes}, cfg)
    )


def _cnn(num_classes: int, shape: Shape, cfg: dict[str, Any]) -> nn.Module:
    c, side = _image(shape)
    derived = {"in_channels": c, "image_size": side, "num_classes": num_classes}
    return CNN(_config(CNNConfig, derived, cfg))


def _vit(num_classes: int, shape: Shape, cfg: dict[str, Any]) -> nn.Module:
    c, side = _image(shape)
    derived = {"in_channels": c, "image_size": side, "num_classes": num_classes}
    return ViT(_config(ViTConfig, derived, cfg))


def _resnet(block: str, layers: tuple[int, int, int, int]) -> Callable[..., nn.Module]:
    def build(num_classes: int, shape: Shape, cfg: dict[str, Any]) -> nn.Module:
        c, side = _image(shape)
        derived = {
            "block": block,
            "layers": layers,
            "num_classes": num_classes,
            "in_channels": c,
            "cifar_stem": side <= 64,
        }
        return ResNet(_config(ResNetConfig, derived, cfg))

    return build


_BUILDERS: dict[str, Callable[[int, Shape, dict[str, Any]], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "resnet18": _resnet("basic", (2, 2, 2, 2)),
    "resnet50": _resnet("bottleneck", (3, 4, 6, 3)),
    "vit_tiny": _vit,
}

_DEFAULT_SHAPES: dict[str, Shape] = {"mlp": (64,), "cnn": (1, 28, 28)}


def model_names() -> list[str]:
    return sorted(_BUILDERS)


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] | None = None,
    seed: int | None = None,
    **cfg: Any,
) -> nn.Module:
    """A freshly initialised model ``name``; see the module docstring for the arguments."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise KeyError(f"unknown model {name!r}; known: {model_names()}")
    shape = (
        tuple(input_shape) if input_shape is not None else _DEFAULT_SHAPES.get(name, (3, 32, 32))
    )
    if seed is None:
        return builder(num_classes, shape, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(num_classes, shape, cfg)
