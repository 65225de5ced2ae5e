"""U-shaped cuts of the MLP, the small CNN and the tiny ViT: device head, edge body, device tail.

The first paper trains the input layers and the classifier on the device and the heavy
middle on an edge GPU; raw inputs and labels never leave the device (only the head's
activations and the gradients at the body's output travel). ``split_model`` returns three
``nn.Module``s that hold the original model's own parameters (not copies), so
``tail(body(head(x)))`` is ``model(x)`` exactly and training the parts trains the model.

Cuts:
- MLP: head = the first Linear + ReLU; body = the hidden layers after it; tail = the last
  Linear. It needs at least two hidden layers (otherwise the body would be empty).
- CNN: head = the first conv block; body = the other conv blocks and the hidden Linear +
  ReLU; tail = the last Linear.
- ViT: head = patch embedding, cls token and position embedding; body = the transformer
  blocks; tail = the final LayerNorm, pooling and the classifier.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from learning.models.cnn import CNN
from learning.models.mlp import MLP
from learning.models.vit import ViT

Part = Literal["head", "body", "tail"]
PARTS: tuple[Part, ...] = ("head", "body", "tail")


@dataclass(frozen=True)
class SplitModel:
    """A model and its three parts, which share its parameters."""

    model: nn.Module
    head: nn.Module
    body: nn.Module
    tail: nn.Module

    def __call__(self, x: Tensor) -> Tensor:
        out: Tensor = self.tail(self.body(self.head(x)))
        return out

    def part(self, name: Part) -> nn.Module:
        return {"head": self.head, "body": self.body, "tail": self.tail}[name]

    def device_parameters(self) -> Iterator[nn.Parameter]:
        """Head and tail parameters: what the device trains."""
        yield from self.head.parameters()
        yield from self.tail.parameters()

    def owner(self) -> dict[str, Part]:
        """The part that holds each entry of the model's state dict (by tensor identity)."""
        ids: dict[int, Part] = {}
        for name in PARTS:
            part = self.part(name)
            for t in [*part.parameters(), *part.buffers()]:
                ids[id(t)] = name
        out: dict[str, Part] = {}
        for key, t in self.model.state_dict(keep_vars=True).items():
            if id(t) not in ids:
                raise ValueError(f"state entry {key!r} belongs to no part of the split")
            out[key] = ids[id(t)]
        return out

    def state_names(self, *parts: Part) -> list[str]:
        """The model's state-dict names held by ``parts`` (e.g. ``"head", "tail"``)."""
        return [k for k, p in self.owner().items() if p in parts]


class _Reshape(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1, *self.shape)


class _ViTHead(nn.Module):
    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.config = vit.config
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        x = x.reshape(-1, c.in_channels, c.image_size, c.image_size)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        if c.pool == "cls":
            tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        out: Tensor = tokens + self.pos_embed
        return out


class _ViTBody(nn.Module):
    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.blocks = vit.blocks

    def forward(self, tokens: Tensor) -> Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return tokens


class _ViTTail(nn.Module):
    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.config = vit.config
        self.norm = vit.norm
        self.head = vit.head

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = self.norm(tokens)
        pooled = tokens[:, 0] if self.config.pool == "cls" else tokens.mean(dim=1)
        out: Tensor = self.head(pooled)
        return out


def _split_mlp(model: MLP) -> SplitModel:
    layers = list(model.net)
    if len(model.config.hidden) < 2:
        raise ValueError(
            f"an MLP needs at least two hidden layers to split (head, body, tail), "
            f"got hidden={model.config.hidden}"
        )
    head = nn.Sequential(nn.Flatten(1), *layers[:2])
    return SplitModel(model, head, nn.Sequential(*layers[2:-1]), nn.Sequential(layers[-1]))


def _split_cnn(model: CNN) -> SplitModel:
    c = model.config
    feats, top = list(model.features), list(model.head)
    head = nn.Sequential(_Reshape(c.in_channels, c.image_size, c.image_size), *feats[:3])
    body = nn.Sequential(*feats[3:], *top[:-1])
    return SplitModel(model, head, body, nn.Sequential(top[-1]))


def _split_vit(model: ViT) -> SplitModel:
    return SplitModel(model, _ViTHead(model), _ViTBody(model), _ViTTail(model))


def split_model(model: nn.Module) -> SplitModel:
    """Cut ``model`` (MLP, CNN or ViT) into head, body and tail sharing its parameters."""
    if isinstance(model, MLP):
        split = _split_mlp(model)
    elif isinstance(model, CNN):
        split = _split_cnn(model)
    elif isinstance(model, ViT):
        split = _split_vit(model)
    else:
        raise ValueError(f"no split is defined for {type(model).__name__} (MLP, CNN, ViT)")
    split.owner()  # every tensor is in exactly one part, or this raises
    return split
