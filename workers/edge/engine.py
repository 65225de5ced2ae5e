"""``EdgeEngine``: the body's forward, backward and optimizer step on a torch device.

What the first paper does on the edge GPU, per group of device requests:

1. **stage**: the group's inputs are packed into one of two pinned host buffers (the
   rotation and its rule are ``workers.pipeline.staging.staging_slot``'s: buffer ``k mod
   2`` is reused only once the copy of its previous user, group k-2, has completed) and
   copied to the GPU with ``non_blocking=True`` on a side copy stream, which records an
   event. ``stage`` returns at once: the server stages the next group's inputs while this
   group's backward runs, so the copy overlaps compute.
2. **forward**: the compute stream waits for that event, runs the body (in bf16 autocast
   when ``autocast``: the paper's "matmul optimisation on the edge"; attention in the ViT's
   blocks is PyTorch's fused scaled-dot-product kernel either way), and copies the output
   to a pinned host buffer asynchronously; only that copy's event is waited on.
3. **backward**: the gradient at the body's output is staged the same way; backward,
   optimizer step, and the gradient at the body's input comes back the same way.

``overlap=False`` is the paper's synchronous baseline: pageable host memory and blocking
copies on the compute stream. On a machine without CUDA the same code runs on the CPU
(no pinned memory, streams or events; timings by wall clock), which is what CI runs.
CUDA event timings are resolved lazily (``timings()``), so timing never synchronises the
pipeline.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from learning.split import body_backward, body_forward, sgd
from workers.pipeline.staging import staging_slot

NUM_BUFFERS = 2


@dataclass(frozen=True)
class EngineOptions:
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    overlap: bool = True  # pinned double buffers + side-stream copies (CUDA)
    autocast: bool = False  # bf16 autocast for the body


@dataclass
class EngineTimings:
    """Seconds summed over the session. On CUDA ``copy_s`` and ``compute_s`` come from
    CUDA events (device time); on the CPU from the wall clock, and ``copy_s`` is 0."""

    groups: int = 0
    rows: int = 0
    stage_s: float = 0.0  # host: packing inputs (and waiting for a staging buffer)
    copy_s: float = 0.0  # host <-> device copies
    compute_s: float = 0.0  # forward, backward and optimizer step

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in vars(self).items()}


@dataclass
class Staged:
    """A batch on (or on its way to) the engine's device."""

    tensor: Tensor
    rows: list[int]
    ready: torch.cuda.Event | None = None  # recorded after its host-to-device copy


@dataclass
class _PinnedRing:
    """Two pinned host buffers in rotation; a buffer is refilled only after its last copy."""

    k: int = 0
    buffers: list[Tensor | None] = field(default_factory=lambda: [None] * NUM_BUFFERS)
    copies: list[torch.cuda.Event | None] = field(default_factory=lambda: [None] * NUM_BUFFERS)

    def take(self, numel: int) -> tuple[int, Tensor]:
        slot = staging_slot(self.k, NUM_BUFFERS)
        self.k += 1
        previous = self.copies[slot.buffer]
        if previous is not None:
            previous.synchronize()  # the DMA engine has finished reading this buffer
        buf = self.buffers[slot.buffer]
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1024), dtype=torch.float32, pin_memory=True)
            self.buffers[slot.buffer] = buf
        return slot.buffer, buf[:numel]


class EdgeEngine:
    """The edge body and its optimizer on ``device``; one group in flight at a time."""

    def __init__(self, body: nn.Module, device: torch.device | str, options: EngineOptions):
        self.device = torch.device(device)
        self.options = options
        self._cuda = self.device.type == "cuda"
        self.body = body.to(self.device)
        self.body.train()
        self.optimizer = sgd(
            self.body.parameters(),
            lr=options.lr,
            momentum=options.momentum,
            weight_decay=options.weight_decay,
        )
        self._timings = EngineTimings()
        self._pending: tuple[Tensor, Tensor] | None = None
        self._copy_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._compute_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._in_ring, self._out_ring = _PinnedRing(), _PinnedRing()

    # --- staging -----------------------------------------------------------------------

    def stage(self, arrays: list[np.ndarray]) -> Staged:
        """Start moving the group's ``arrays`` (stacked along the batch axis) to the device."""
        rows = [len(a) for a in arrays]
        shape = (sum(rows), *arrays[0].shape[1:])
        t0 = time.perf_counter()
        if not self._cuda:
            tensor = torch.from_numpy(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
            self._timings.stage_s += time.perf_counter() - t0
            return Staged(tensor, rows)
        if not self.options.overlap:
            host = torch.from_numpy(np.concatenate(arrays))
            start, done = self._events()
            start.record()
            tensor = host.to(self.device)  # pageable: a blocking copy on the compute stream
            done.record()
            self._copy_events.append((start, done))
            self._timings.stage_s += time.perf_counter() - t0
            return Staged(tensor, rows)
        b, flat = self._in_ring.take(int(np.prod(shape)))
        host = flat.view(shape)
        np.concatenate(arrays, out=host.numpy())
        start, done = self._events()
        with torch.cuda.stream(self._copy_stream):
            tensor = torch.empty(shape, dtype=torch.float32, device=self.device)
            start.record(self._copy_stream)
            tensor.copy_(host, non_blocking=True)
            done.record(self._copy_stream)
        # Allocated on the copy stream, used on the compute stream: keep the allocator from
        # handing its memory out again before the compute stream is done with it.
        tensor.record_stream(torch.cuda.current_stream(self.device))
        self._in_ring.copies[b] = done
        self._copy_events.append((start, done))
        self._timings.stage_s += time.perf_counter() - t0
        return Staged(tensor, rows, done)

    # --- compute -----------------------------------------------------------------------

    def forward(self, staged: Staged) -> np.ndarray:
        """The body's output (float32, host) for a staged group; keeps its graph."""
        if self._pending is not None:
            raise RuntimeError("forward while the previous group still awaits its backward")
        self._wait(staged)
        with self._clock():
            with self._autocast():
                inp, out = body_forward(self.body, staged.tensor)
            result = self._to_host(out.detach().float())
        self._pending = (inp, out)
        self._timings.groups += 1
        self._timings.rows += len(staged.tensor)
        return result

    def backward(self, staged_grad: Staged) -> np.ndarray:
        """Backward of the pending group with ``d loss / d out``, an optimizer step, and
        ``d loss / d in`` (float32, host)."""
        if self._pending is None:
            raise RuntimeError("backward without a pending forward")
        inp, out = self._pending
        self._pending = None
        if tuple(staged_grad.tensor.shape) != tuple(out.shape):
            raise ValueError(
                f"gradient is {tuple(staged_grad.tensor.shape)}, output {tuple(out.shape)}"
            )
        self._wait(staged_grad)
        with self._clock():
            self.optimizer.zero_grad(set_to_none=True)
            grad = body_backward(inp, out, staged_grad.tensor)
            self.optimizer.step()
            return self._to_host(grad.float())

    def drop_pending(self) -> None:
        """Forget the pending group's graph (its devices are gone)."""
        self._pending = None

    def timings(self) -> EngineTimings:
        """Timings so far; on CUDA this waits for the queued work to finish."""
        if self._cuda:
            torch.cuda.synchronize(self.device)
            for start, end in self._copy_events:
                self._timings.copy_s += start.elapsed_time(end) / 1e3
            for start, end in self._compute_events:
                self._timings.compute_s += start.elapsed_time(end) / 1e3
            self._copy_events, self._compute_events = [], []
        return self._timings

    # --- helpers -----------------------------------------------------------------------

    def _events(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def _wait(self, staged: Staged) -> None:
        if staged.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(staged.ready)

    def _autocast(self) -> AbstractContextManager[object]:
        if not self.options.autocast:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _clock(self) -> AbstractContextManager[object]:
        engine = self

        class _Clock:
            def __enter__(self) -> None:
                if engine._cuda:
                    self.events = engine._events()
                    self.events[0].record()
                else:
                    self.t0 = time.perf_counter()

            def __exit__(self, *exc: object) -> None:
                if engine._cuda:
                    self.events[1].record()
                    engine._compute_events.append(self.events)
                else:
                    engine._timings.compute_s += time.perf_counter() - self.t0

        return _Clock()

    def _to_host(self, t: Tensor) -> np.ndarray:
        if not self._cuda:
            return t.numpy()
        if not self.options.overlap:
            start, done = self._events()
            start.record()
            host = t.cpu()  # blocking, pageable
            done.record()
            self._copy_events.append((start, done))
            return host.numpy()
        b, flat = self._out_ring.take(t.numel())
        host = flat.view(t.shape)
        start, done = self._events()
        start.record()
        host.copy_(t, non_blocking=True)
        done.record()
        self._out_ring.copies[b] = done
        self._copy_events.append((start, done))
        done.synchronize()  # only this copy, not the whole device
        return host.numpy().copy()  # the pinned buffer is reused two groups later
