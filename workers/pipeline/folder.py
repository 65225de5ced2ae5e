"""``TorchFolder``: the weighted-mean accumulator (FedAvg family) on a torch device.

It takes the same calls as learning's ``WeightedMean`` (``add(tensors, weight)``,
``count``, ``result()``, ``partial()``) and returns the same thing: ``Σ w_k Δ_k / Σ w_k``
per tensor, as float64 numpy arrays of the update's shapes, so a strategy's server step is
unchanged.

On CUDA, one ``add`` is:

1. wait until staging buffer ``k mod 2`` is free: the event recorded after its previous
   host-to-device copy (update k-2) has completed (see ``staging``);
2. pack the update into that pinned float32 buffer (a numpy view of the pinned tensor);
3. on the side copy stream, after the fold that last read device buffer ``k mod 2``:
   copy host -> device with ``non_blocking=True``, then record an event;
4. on the compute stream, wait for that event and accumulate in float64
   (``acc += w * buf``, one kernel: ``add_`` with ``alpha`` computes in the accumulator's
   float64).

``add`` returns once the work is queued: the caller decodes the next update while the
copy and the fold run, and the next ``add`` packs its update into the other buffer while
the device may still be reading this one. On the CPU (``device="cpu"``) the same code runs
without streams, events or pinned memory: the "device buffer" is the staging buffer
itself and the fold runs at once, in numpy through a small float64 scratch as
``WeightedMean`` does (torch's CPU kernel for a float64 += float32 add casts through a
temporary and was 5-10x slower here). ``timings`` records where the time went, for the
benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from learning.strategies import PartialSum
from workers.pipeline.device import DeviceUnavailable
from workers.pipeline.staging import FlatLayout, staging_slot

Weights = dict[str, np.ndarray]

NUM_BUFFERS = 2
# Elements per slice of the CPU fold: its float64 scratch is 512 KiB (as WeightedMean's).
CPU_SLICE = 1 << 16


@dataclass
class FoldTimings:
    """Seconds spent, summed over the updates folded."""

    updates: int = 0
    stage_s: float = 0.0  # host: packing updates into the staging buffers
    wait_s: float = 0.0  # host: waiting for a staging buffer's previous copy to finish
    copy_s: float = 0.0  # device: host-to-device copies (CUDA events); 0 on the CPU
    compute_s: float = 0.0  # device: the float64 accumulation (CUDA events, or CPU time)
    total_s: float = 0.0  # wall clock, from the first add to the end of result()

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in vars(self).items()}


class TorchFolder:
    """Streaming weighted mean on ``device`` (``cpu``, ``cuda`` or ``cuda:N``)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        if self._cuda and not torch.cuda.is_available():
            raise DeviceUnavailable(f"TorchFolder: {self.device} asked for, no CUDA device")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"TorchFolder folds on cpu or cuda, not {self.device}")
        self.timings = FoldTimings()
        self._layout: FlatLayout | None = None
        self._acc: torch.Tensor | None = None
        self._scratch = np.empty(0, dtype=np.float64)  # the CPU fold's products
        self._host: list[torch.Tensor] = []  # staging buffers (pinned on CUDA)
        self._host_np: list[np.ndarray] = []  # numpy views of them, for packing
        self._dev: list[torch.Tensor] = []  # device copies (the staging buffers on CPU)
        # Per buffer: (update index, event recorded after its copy), and the event
        # recorded after the fold that last read the device buffer.
        self._copied: list[tuple[int, torch.cuda.Event | None] | None] = []
        self._folded: list[torch.cuda.Event | None] = []
        self._events: list[tuple[torch.cuda.Event, ...]] = []  # for timings, per update
        self._copy_stream: torch.cuda.Stream | None = None
        self._compute_stream: torch.cuda.Stream | None = None
        self._total = 0.0
        self._count = 0
        self._began: float | None = None
        self._result: Weights | None = None
        self._partial_taken = False

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total

    # --- adding ------------------------------------------------------------------------

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        if self._result is not None or self._partial_taken:
            raise ValueError("result() was already taken; start a new accumulator")
        w = float(weight)
        if not (w > 0 and np.isfinite(w)):
            raise ValueError(f"update weight must be positive, got {weight!r}")
        if self._began is None:
            self._began = time.perf_counter()
        if self._layout is None:
            self._setup(FlatLayout.of(tensors))
        else:
            self._layout.check(tensors)
        layout = self._layout
        assert layout is not None

        k = self._count
        slot = staging_slot(k, NUM_BUFFERS)
        t0 = time.perf_counter()
        previous = self._copied[slot.buffer]
        if slot.reuses is not None:
            # The rotation's invariant: the buffer's last copy is the one it names.
            assert previous is not None and previous[0] == slot.reuses, (previous, slot)
            if previous[1] is not None:
                previous[1].synchronize()  # its copy has left the host buffer
        t1 = time.perf_counter()
        layout.pack(tensors, self._host_np[slot.buffer])
        t2 = time.perf_counter()
        self.timings.wait_s += t1 - t0
        self.timings.stage_s += t2 - t1
        if self._cuda:
            self._launch(k, slot.buffer, w)
        else:
            self._fold_now(k, slot.buffer, w)
        self._total += w
        self._count += 1
        self.timings.updates = self._count

    def _setup(self, layout: FlatLayout) -> None:
        n = layout.size
        self._layout = layout
        self._acc = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._host = [
            torch.empty(n, dtype=torch.float32, pin_memory=self._cuda) for _ in range(NUM_BUFFERS)
        ]
        self._host_np = [h.numpy() for h in self._host]
        if self._cuda:
            self._dev = [
                torch.empty(n, dtype=torch.float32, device=self.device) for _ in range(NUM_BUFFERS)
            ]
            self._copy_stream = torch.cuda.Stream(self.device)
            self._compute_stream = torch.cuda.Stream(self.device)
            # A folder dropped mid-round (an error while decoding) frees these with work
            # still queued on the side streams: tell the caching allocator, so that it does
            # not hand the memory to someone else before that work is done.
            for t in (self._acc, *self._dev):
                t.record_stream(self._copy_stream)
                t.record_stream(self._compute_stream)
            # The zeros and buffers were made on the default stream: finish them before
            # the side streams touch them.
            torch.cuda.synchronize(self.device)
        else:
            self._dev = self._host
            self._scratch = np.empty(max(1, min(n, CPU_SLICE)), dtype=np.float64)
        self._copied = [None] * NUM_BUFFERS
        self._folded = [None] * NUM_BUFFERS

    def _launch(self, k: int, b: int, w: float) -> None:
        copy_stream, compute_stream, acc = self._copy_stream, self._compute_stream, self._acc
        assert copy_stream is not None and compute_stream is not None and acc is not None
        copy_start, copied, fold_start, folded = (
            torch.cuda.Event(enable_timing=True) for _ in range(4)
        )
        with torch.cuda.stream(copy_stream):
            last_fold = self._folded[b]
            if last_fold is not None:
                # Device buffer b was last read by the fold of update k-2.
                copy_stream.wait_event(last_fold)
            copy_start.record(copy_stream)
            self._dev[b].copy_(self._host[b], non_blocking=True)
            copied.record(copy_stream)
        with torch.cuda.stream(compute_stream):
            compute_stream.wait_event(copied)
            fold_start.record(compute_stream)
            acc.add_(self._dev[b], alpha=w)
            folded.record(compute_stream)
        self._copied[b] = (k, copied)
        self._folded[b] = folded
        self._events.append((copy_start, copied, fold_start, folded))

    def _fold_now(self, k: int, b: int, w: float) -> None:
        assert self._acc is not None
        acc, buf, step = self._acc.numpy(), self._host_np[b], self._scratch.size
        t0 = time.perf_counter()
        for i in range(0, acc.size, step):
            part = acc[i : i + step]
            tmp = self._scratch[: part.size]
            np.multiply(buf[i : i + step], np.float64(w), out=tmp)  # in float64
            part += tmp
        self.timings.compute_s += time.perf_counter() - t0
        self._copied[b] = (k, None)  # nothing in flight on the CPU

    # --- the result --------------------------------------------------------------------

    def result(self) -> Weights:
        """The weighted mean (float64 numpy arrays); finishes the accumulator."""
        if self._partial_taken:
            raise ValueError("partial() took the sums; start a new accumulator")
        if self._result is None:
            self._result = self._finish(divide=True)
        return dict(self._result)

    def partial(self) -> PartialSum:
        """The float64 sums and total weight, not divided (hierarchical aggregation adds
        them to other parts' sums); finishes the accumulator."""
        if self._result is not None or self._partial_taken:
            raise ValueError("result() was already taken; start a new accumulator")
        sums = self._finish(divide=False)
        self._partial_taken = True
        return PartialSum(sums, self._total, self._count)

    def _finish(self, *, divide: bool) -> Weights:
        if not self._count:
            raise ValueError("no updates were added")
        acc, layout = self._acc, self._layout
        assert acc is not None and layout is not None
        if self._cuda:
            stream = self._compute_stream
            assert stream is not None
            if divide:
                with torch.cuda.stream(stream):
                    acc.div_(self._total)
            stream.synchronize()  # every copy and fold has finished too
            sums = acc.cpu().numpy()
            for copy_start, copied, fold_start, folded in self._events:
                self.timings.copy_s += copy_start.elapsed_time(copied) / 1e3
                self.timings.compute_s += fold_start.elapsed_time(folded) / 1e3
        else:
            sums = acc.numpy()
            if divide:
                sums /= self._total  # numpy, as WeightedMean: the CPU result is its, bit for bit
        out = layout.unpack(sums)
        self._release()
        assert self._began is not None
        self.timings.total_s = time.perf_counter() - self._began
        return out

    def _release(self) -> None:
        """Drop the staging buffers, device buffers and events (the result is kept)."""
        self._acc = None
        self._scratch = np.empty(0, dtype=np.float64)
        self._host, self._host_np, self._dev = [], [], []
        self._copied, self._folded, self._events = [], [], []
        self._copy_stream = self._compute_stream = None
