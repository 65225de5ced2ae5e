"""Local training: SGD with momentum over a client's data, with an optional FedProx term.

``train_local`` is what a device runs in a round and what the replica runs for each client.
It is deterministic for a seed: torch's CPU generator is seeded with ``seed`` for the call
(and restored afterwards), and the shuffle order of every epoch comes from a
``torch.Generator`` seeded with ``seed``. A fresh optimizer is made per call, so momentum
does not carry over from one round to the next. Threads (``torch.set_num_threads``) are the
caller's business.

FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) adds
``mu/2 · ||w - w_global||²`` over the trainable parameters to each batch's loss.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TrainResult:
    num_samples: int
    loss: float  # mean training loss over the last epoch
    accuracy: float  # training accuracy over the last epoch (measured while training)
    seconds: float


def _anchor(
    model: nn.Module, global_params: Mapping[str, np.ndarray | Tensor] | None
) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    if global_params is None:  # the weights the model starts from: the round's global model
        return {n: p.detach().clone() for n, p in params.items()}
    return {n: torch.as_tensor(global_params[n], dtype=p.dtype).clone() for n, p in params.items()}


def train_local(
    model: nn.Module,
    x: np.ndarray | Tensor,
    y: np.ndarray | Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    global_params: Mapping[str, np.ndarray | Tensor] | None = None,
    seed: int = 0,
) -> TrainResult:
    """Train ``model`` in place; ``global_params`` (default: its start) anchor FedProx."""
    started = time.perf_counter()
    xs, ys = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    n = len(ys)
    if n == 0 or epochs < 1:
        return TrainResult(n, float("nan"), float("nan"), time.perf_counter() - started)
    anchor = _anchor(model, global_params) if proximal_mu > 0 else {}
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    loss_sum, correct = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        # Dropout and any other sampling inside the model. The CPU generator only (what
        # fork_rng restores): torch.manual_seed also seeds CUDA lazily, and recording that
        # lazy call formats a stack trace, a millisecond a call, most of a small model's step.
        torch.default_generator.manual_seed(seed)
        for _ in range(epochs):
            loss_sum, correct = 0.0, 0
            order = torch.randperm(n, generator=shuffle)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                logits = model(xs[idx])
                loss = F.cross_entropy(logits, ys[idx])
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(dim=1) == ys[idx]).sum())
                if anchor:
                    loss = loss + proximal_mu / 2 * _sq_distance(model, anchor)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return TrainResult(n, loss_sum / n, correct / n, time.perf_counter() - started)


def _sq_distance(model: nn.Module, anchor: Mapping[str, Tensor]) -> Tensor:
    total = torch.zeros(())
    for name, p in model.named_parameters():
        if p.requires_grad:
            total = total + ((p - anchor[name]) ** 2).sum()
    return total
