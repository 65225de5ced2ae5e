"""A small CNN for 28x28 / 32x32 images (and 8x8 digits): conv-ReLU-pool blocks, two linears.

Each entry of ``channels`` is one 3x3 convolution (padding 1) + ReLU + 2x2 max-pool, so the
image side is halved per block; the flattened features go through ``hidden`` to the head.
A flat input (N, C*H*W) is reshaped to (N, C, H, W) from the config.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, ...] = (32, 64)
    hidden: int = 128
    num_classes: int = 10


class CNN(nn.Module):
    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        blocks: list[nn.Module] = []
        c_in, side = config.in_channels, config.image_size
        for c_out in config.channels:
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, side = c_out, side // 2
        if side < 1:
            n, side0 = len(config.channels), config.image_size
            raise ValueError(f"{n} pooling blocks are too many for an image side of {side0}")
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * side * side, config.hidden),
            nn.ReLU(),
            nn.Linear(config.hidden, config.num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        c, s = self.config.in_channels, self.config.image_size
        out: Tensor = self.head(self.features(x.reshape(-1, c, s, s)))
        return out
