"""Softmax cross-entropy for the device tail: fused and numerically stable, or unfused.

The first paper's "softmax optimisation on devices": the loss and its gradient come from
one pass over the logits. Forward subtracts the row maximum (so ``exp`` never overflows),
takes ``logsumexp`` and keeps ``softmax`` for backward, whose gradient is then simply
``(softmax - onehot(y)) / N`` with no extra exponentials and no autograd graph through
softmax, log and gather. ``unfused_cross_entropy`` is the baseline the paper improves on:
softmax, log and NLL as three autograd ops (clamped so that a zero probability gives a
large loss instead of infinity).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LossName = Literal["fused", "torch", "unfused"]


class _SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor) -> Tensor:
        x = logits.float()
        shifted = x - x.amax(dim=1, keepdim=True)
        probs = shifted.exp()
        sums = probs.sum(dim=1, keepdim=True)
        picked = shifted.gather(1, target[:, None])
        loss = (sums.log() - picked).mean()
        probs.div_(sums)
        ctx.save_for_backward(probs, target)
        ctx.input_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        probs, target = ctx.saved_tensors
        g = probs.clone()
        g[torch.arange(len(target), device=g.device), target] -= 1.0
        g.mul_(grad / len(target))
        return g.to(ctx.input_dtype), None


# torch leaves Function.apply unannotated; this is its signature for this Function.
_softmax_cross_entropy: Callable[[Tensor, Tensor], Tensor] = _SoftmaxCrossEntropy.apply


def fused_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean softmax cross-entropy of ``logits`` (N, C) against class ids ``target`` (N,)."""
    if logits.ndim != 2 or target.shape != (logits.shape[0],):
        raise ValueError(
            f"expected logits (N, C) and target (N,), got {logits.shape}, {target.shape}"
        )
    return _softmax_cross_entropy(logits, target)


def unfused_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    probs = torch.softmax(logits, dim=1)
    return -torch.log(probs.gather(1, target[:, None]).clamp_min(1e-30)).mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "fused": fused_cross_entropy,
    "torch": F.cross_entropy,
    "unfused": unfused_cross_entropy,
}


def loss_fn(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; one of {sorted(LOSSES)}") from None
