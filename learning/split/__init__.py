"""Split learning (paper 1): U-shaped cuts of models, the device loss, the split step."""

from learning.split.cuts import PARTS, Part, SplitModel, split_model
from learning.split.loss import fused_cross_entropy, loss_fn, unfused_cross_entropy
from learning.split.step import (
    EdgeLink,
    LocalEdge,
    SplitTimings,
    body_backward,
    body_forward,
    sgd,
    tail_step,
    train_split,
)

__all__ = [
    "PARTS",
    "EdgeLink",
    "LocalEdge",
    "Part",
    "SplitModel",
    "SplitTimings",
    "body_backward",
    "body_forward",
    "fused_cross_entropy",
    "loss_fn",
    "sgd",
    "split_model",
    "tail_step",
    "train_split",
    "unfused_cross_entropy",
]
