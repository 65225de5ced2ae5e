"""A tiny Vision Transformer for 32x32 images.

Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021), scaled down: 4x4 patches
embedded by a strided convolution, learned position embeddings, a cls token (or mean
pooling over the patches), ``depth`` pre-norm encoder blocks with ``heads`` attention heads,
and a LayerNorm + linear head. 32x32 images with patch 4 give 64 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    num_classes: int = 10
    pool: Literal["cls", "mean"] = "cls"
    dropout: float = 0.0


class ViT(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if config.dim % config.heads:
            raise ValueError("dim must be a multiple of heads")
        self.config = config
        c = config
        n_patches = (c.image_size // c.patch_size) ** 2
        self.patch_embed = nn.Conv2d(c.in_channels, c.dim, c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        n_tokens = n_patches + (1 if c.pool == "cls" else 0)
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, c.dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                c.dim,
                c.heads,
                dim_feedforward=c.dim * c.mlp_ratio,
                dropout=c.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        x = x.reshape(-1, c.in_channels, c.image_size, c.image_size)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, patches, dim)
        if c.pool == "cls":
            tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        pooled = tokens[:, 0] if c.pool == "cls" else tokens.mean(dim=1)
        out: Tensor = self.head(pooled)
        return out
