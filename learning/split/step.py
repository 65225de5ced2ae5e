"""The split training step as pure functions, and local training over any edge.

Per batch (U-shaped split learning):

1. device: ``acts = head(x)``; send ``acts`` to the edge;
2. edge: ``out = body(acts)``; send ``out`` back (``EdgeLink.forward``);
3. device: ``loss = CE(tail(out), y)``; backward through the tail gives the tail's
   gradients and ``d loss / d out``; send that to the edge;
4. edge: backward through the body gives the body's gradients (its optimizer steps) and
   ``d loss / d acts``; send that back (``EdgeLink.backward``);
5. device: backward through the head with that gradient; its optimizer steps.

Plain SGD, momentum and weight decay act per parameter, so a device optimizer over head
and tail plus an edge optimizer over the body take exactly the steps one optimizer takes
over the whole model: ``train_split`` with one device and an exact (fp32) link gives the
weights ``learning.train.train_local`` gives, for the same seed and batches (the tests
check it to 1e-5 relative). ``LocalEdge`` is the edge as a pure in-process object; the
edge worker (``workers.edge``) and the device's bus link (``devices.split``) implement
the same ``EdgeLink`` over RabbitMQ.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from learning.split.cuts import SplitModel
from learning.split.loss import loss_fn
from learning.train import TrainResult


class EdgeLink(Protocol):
    """The device's view of the edge: two calls per batch, in this order."""

    def forward(self, acts: Tensor) -> Tensor:
        """The body's output for the head's activations ``acts`` (detached)."""
        ...

    def backward(self, grad_out: Tensor) -> Tensor:
        """Given ``d loss / d out`` for the last ``forward``, the edge steps its body and
        returns ``d loss / d acts``."""
        ...


def sgd(
    params: Iterable[nn.Parameter], *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.SGD:
    return torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)


def body_forward(body: nn.Module, acts: Tensor) -> tuple[Tensor, Tensor]:
    """(input leaf that will hold ``d loss / d acts``, body output with its graph)."""
    inp = acts.detach().requires_grad_(True)
    return inp, body(inp)


def body_backward(inp: Tensor, out: Tensor, grad_out: Tensor) -> Tensor:
    """Backward through the body (its parameters' ``.grad`` filled); ``d loss / d acts``."""
    out.backward(grad_out.to(out.dtype))
    assert inp.grad is not None
    return inp.grad


def tail_step(
    tail: nn.Module, out: Tensor, y: Tensor, loss: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward and backward through the tail: (loss, logits, ``d loss / d out``)."""
    z = out.detach().requires_grad_(True)
    logits = tail(z)
    value = loss(logits, y)
    value.backward()
    assert z.grad is not None
    return value.detach(), logits.detach(), z.grad


@dataclass
class LocalEdge:
    """The edge as a plain object: the body, its optimizer and the pending batch's graph."""

    body: nn.Module
    optimizer: torch.optim.Optimizer
    _pending: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def forward(self, acts: Tensor) -> Tensor:
        self.body.train()
        self._pending = body_forward(self.body, acts)
        return self._pending[1].detach()

    def backward(self, grad_out: Tensor) -> Tensor:
        if self._pending is None:
            raise RuntimeError("backward without a forward")
        inp, out = self._pending
        self._pending = None
        self.optimizer.zero_grad(set_to_none=True)
        grad = body_backward(inp, out, grad_out)
        self.optimizer.step()
        return grad


@dataclass
class SplitTimings:
    """Device-side seconds, summed over the batches."""

    head_s: float = 0.0
    edge_s: float = 0.0  # waiting for the edge: forward + backward round trips
    tail_s: float = 0.0
    loss_s: float = 0.0  # softmax cross-entropy forward and backward (inside tail_s)
    batches: int = 0


def train_split(
    split: SplitModel,
    edge: EdgeLink,
    x: np.ndarray | Tensor,
    y: np.ndarray | Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    loss: str = "fused",
    timings: SplitTimings | None = None,
    pipeline: bool = False,
) -> TrainResult:
    """Train the device parts of ``split`` with ``edge`` holding the body; the batches,
    shuffles and seeding are ``train_local``'s, so the two compare one to one.

    ``pipeline`` keeps the device busy while the edge computes (see ``_pipelined_epoch``):
    the head's update then lags one batch, so the weights are no longer those of unsplit
    training; off by default."""
    started = time.perf_counter()
    xs, ys = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    n = len(ys)
    if n == 0 or epochs < 1:
        return TrainResult(n, float("nan"), float("nan"), time.perf_counter() - started)
    t = timings if timings is not None else SplitTimings()
    criterion = _timed(loss_fn(loss), t)
    opt = sgd(split.device_parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    shuffle = torch.Generator().manual_seed(seed)
    split.head.train()
    split.tail.train()
    loss_sum, correct = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only, as in learning.train
        for _ in range(epochs):
            loss_sum, correct = 0.0, 0
            order = torch.randperm(n, generator=shuffle)
            if pipeline:
                batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
                loss_sum, correct = _pipelined_epoch(
                    split, edge, opt, criterion, xs, ys, batches, t
                )
                continue
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                t0 = time.perf_counter()
                acts = split.head(xs[idx])
                t1 = time.perf_counter()
                out = edge.forward(acts.detach())
                t2 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                value, logits, grad_out = tail_step(split.tail, out, ys[idx], criterion)
                t3 = time.perf_counter()
                grad_acts = edge.backward(grad_out)
                t4 = time.perf_counter()
                acts.backward(grad_acts.to(acts.dtype))
                opt.step()
                t5 = time.perf_counter()
                loss_sum += float(value) * len(idx)
                correct += int((logits.argmax(dim=1) == ys[idx]).sum())
                t.head_s += (t1 - t0) + (t5 - t4)
                t.edge_s += (t2 - t1) + (t4 - t3)
                t.tail_s += t3 - t2
                t.batches += 1
    return TrainResult(n, loss_sum / n, correct / n, time.perf_counter() - started)


def _stashed_forward(head: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``head(x)`` on a copy of the head's parameters (weight stashing, as PipeDream): the
    head's gradient for these activations is then taken at the weights that made them,
    even after the optimizer has stepped the live parameters in place meanwhile."""
    stash = {n: p.detach().clone().requires_grad_(True) for n, p in head.named_parameters()}
    return functional_call(head, stash, (x,)), stash


def _pipelined_epoch(
    split: SplitModel,
    edge: EdgeLink,
    opt: torch.optim.Optimizer,
    criterion: Callable[[Tensor, Tensor], Tensor],
    xs: Tensor,
    ys: Tensor,
    batches: list[Tensor],
    t: SplitTimings,
) -> tuple[float, int]:
    """One epoch with the device never idle while the edge computes.

    The edge's calls run in order on one link thread. Batch ``i``'s backward is handed to
    it, then, before waiting for its answer, the device computes the head's activations of
    batch ``i + 1`` and queues their forward; the head's backward and step of batch ``i``
    follow when the answer is in. So the head's activations of batch ``i + 1`` come from
    the head before batch ``i``'s step: the head's gradient is taken at the weights that
    made the activations (stashed) and applied one step late. Body and tail are exact
    (the edge runs each forward after the previous step; the tail steps every batch).
    """
    head = dict(split.head.named_parameters())
    loss_sum, correct = 0.0, 0
    with ThreadPoolExecutor(1, thread_name_prefix="edge-link") as link:
        t0 = time.perf_counter()
        acts, stash = _stashed_forward(split.head, xs[batches[0]])
        t.head_s += time.perf_counter() - t0
        ahead: Future[Tensor] = link.submit(edge.forward, acts.detach())
        for i, idx in enumerate(batches):
            t1 = time.perf_counter()
            out = ahead.result()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            value, logits, grad_out = tail_step(split.tail, out, ys[idx], criterion)
            t3 = time.perf_counter()
            back = link.submit(edge.backward, grad_out)
            if i + 1 < len(batches):
                next_acts, next_stash = _stashed_forward(split.head, xs[batches[i + 1]])
                ahead = link.submit(edge.forward, next_acts.detach())
            t4 = time.perf_counter()
            grad_acts = back.result()
            t5 = time.perf_counter()
            acts.backward(grad_acts.to(acts.dtype))
            for name, p in head.items():
                p.grad = stash[name].grad
            opt.step()
            if i + 1 < len(batches):
                acts, stash = next_acts, next_stash
            t6 = time.perf_counter()
            loss_sum += float(value) * len(idx)
            correct += int((logits.argmax(dim=1) == ys[idx]).sum())
            t.head_s += (t4 - t3) + (t6 - t5)
            t.edge_s += (t2 - t1) + (t5 - t4)
            t.tail_s += t3 - t2
            t.batches += 1
    return loss_sum, correct


def _timed(
    fn: Callable[[Tensor, Tensor], Tensor], t: SplitTimings
) -> Callable[[Tensor, Tensor], Tensor]:
    """``fn`` whose forward and backward time is added to ``t.loss_s``."""

    class _Clock(torch.autograd.Function):
        # An identity whose backward marks when the loss's backward has finished.
        @staticmethod
        def forward(ctx: object, logits: Tensor) -> Tensor:
            return logits.view_as(logits)

        @staticmethod
        def backward(ctx: object, grad: Tensor) -> Tensor:
            t.loss_s += time.perf_counter() - clock[0]
            return grad

    clock = [0.0]

    class _Start(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, value: Tensor) -> Tensor:
            return value.view_as(value)

        @staticmethod
        def backward(ctx: object, grad: Tensor) -> Tensor:
            clock[0] = time.perf_counter()
            return grad

    # torch leaves Function.apply unannotated: both are identities on a tensor.
    clocked: Callable[[Tensor], Tensor] = _Clock.apply
    started: Callable[[Tensor], Tensor] = _Start.apply

    def timed(logits: Tensor, y: Tensor) -> Tensor:
        t0 = time.perf_counter()
        value = fn(clocked(logits), y)
        t.loss_s += time.perf_counter() - t0
        return started(value)

    return timed
