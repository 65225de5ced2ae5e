"""WebAssembly device runtime: the MLP's training step inside a wasmtime sandbox.

``Sandbox`` instantiates a module with nothing to import (a module asking for any import is
refused before it runs), a cap on its linear memory (wasmtime's store limits: ``memory.grow``
past the cap fails and the module reports it) and a limit per call that stops a runaway
loop: by default a wall-clock one (epoch interruption: one daemon thread advances the epoch
of every sandbox's engine every ``EPOCH_TICK_S``), or a deterministic instruction budget
(fuel), which costs about twice the time of the kernels (docs/benchmarks.md). Each failure
surfaces as a ``WasmError`` with a reason.

``WasmMLP`` drives ``devices/wasm/kernels.wasm``: weights, batches and labels are copied into
the module's memory, one exported call runs forward, fused softmax cross-entropy, backward
and the SGD-with-momentum update, and the weights are copied back out. ``train_epoch`` holds
the whole data set in module memory and runs up to ``steps_per_call`` steps per exported
call (the module gathers each batch itself), so the host's per-call costs and the runaway
guard's per-call set-up are paid once per many steps. Shapes and layouts follow
``learning.models.MLP`` (``net.<i>.weight`` (out, in), ``net.<i>.bias``).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import wasmtime

from devices.wasm import MODULE_PATH

DEFAULT_MEMORY_CAP = 256 * 1024 * 1024
DEFAULT_TIME_LIMIT_S = 30.0  # one exported call (up to STEPS_PER_CALL steps) may run this long
# Steps one exported call of train_epoch runs: a digits step is ~0.1 ms, a 784-256-10 one
# ~5 ms, so a call stays far below the time limit and the per-call cost (~10 µs) vanishes.
STEPS_PER_CALL = 64
EPOCH_TICK_S = 0.01


class WasmError(RuntimeError):
    """The module was refused, trapped, ran out of fuel or out of memory."""


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int = DEFAULT_MEMORY_CAP  # linear memory cap (store limit)
    # Wall-clock seconds one exported call may run (epoch interruption); None: no limit.
    time_limit_s: float | None = DEFAULT_TIME_LIMIT_S
    # Instructions (fuel, ~1 per WebAssembly instruction; a digits step spends ~10^6) one
    # call may run; None: not metered. Deterministic, but slower than the time limit.
    fuel_per_call: int | None = None


class _EpochTicker:
    """One daemon thread that advances the epoch of every live sandbox engine."""

    def __init__(self) -> None:
        self._engines: weakref.WeakSet[wasmtime.Engine] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, engine: wasmtime.Engine) -> None:
        with self._lock:
            self._engines.add(engine)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="wasm-epoch", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(EPOCH_TICK_S)
            with self._lock:
                engines = list(self._engines)
            for engine in engines:
                engine.increment_epoch()


_TICKER = _EpochTicker()


class Sandbox:
    """One instance of a module, with no host functions, a memory cap and fuel."""

    def __init__(self, wasm: bytes, limits: SandboxLimits | None = None) -> None:
        self.limits = limits or SandboxLimits()
        config = wasmtime.Config()
        config.consume_fuel = self.limits.fuel_per_call is not None
        config.epoch_interruption = self.limits.time_limit_s is not None
        self.engine = wasmtime.Engine(config)
        if self.limits.time_limit_s is not None:
            self._ticks = max(1, round(self.limits.time_limit_s / EPOCH_TICK_S))
            _TICKER.add(self.engine)
        try:
            module = wasmtime.Module(self.engine, wasm)
        except wasmtime.WasmtimeError as e:
            raise WasmError(f"invalid WebAssembly module: {e}") from None
        imports = [f"{i.module}.{i.name}" for i in module.imports]
        if imports:
            # The sandbox offers nothing: no files, clock, network or host code of any kind.
            raise WasmError(f"module refused: it imports {', '.join(imports)}; none are provided")
        self.store = wasmtime.Store(self.engine)
        self.store.set_limits(memory_size=self.limits.memory_bytes, instances=1, memories=1)
        self._refuel()
        try:
            self.instance = wasmtime.Instance(self.store, module, [])
        except (wasmtime.WasmtimeError, wasmtime.Trap) as e:
            raise WasmError(f"module could not be instantiated: {e}") from None
        self.exports = self.instance.exports(self.store)
        memory = self.exports.get("memory")
        self.memory = memory if isinstance(memory, wasmtime.Memory) else None

    @classmethod
    def from_file(cls, path: Path, limits: SandboxLimits | None = None) -> Sandbox:
        return cls(path.read_bytes(), limits)

    def call(self, name: str, *args: int | float) -> int | float | None:
        """Call export ``name`` with a fresh fuel budget."""
        func = self.exports.get(name)
        if not isinstance(func, wasmtime.Func):
            raise WasmError(f"module has no exported function {name!r}")
        self._refuel()
        try:
            return func(self.store, *args)
        except wasmtime.Trap as e:
            if e.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
                raise WasmError(
                    f"{name}: stopped after {self.limits.fuel_per_call} units of fuel"
                ) from None
            if e.trap_code == wasmtime.TrapCode.INTERRUPT:
                raise WasmError(
                    f"{name}: stopped after its time limit of {self.limits.time_limit_s} s"
                ) from None
            raise WasmError(f"{name}: trapped: {e.message}") from None
        except wasmtime.WasmtimeError as e:
            raise WasmError(f"{name}: {e}") from None

    def _refuel(self) -> None:
        """A fresh budget for the next call: fuel and/or an epoch deadline from now."""
        if self.limits.fuel_per_call is not None:
            self.store.set_fuel(self.limits.fuel_per_call)
        if self.limits.time_limit_s is not None:
            self.store.set_epoch_deadline(self._ticks)

    def _view(self, ptr: int, nbytes: int) -> np.ndarray:
        if self.memory is None:
            raise WasmError("module exports no memory")
        size = self.memory.data_len(self.store)
        if ptr <= 0 or ptr + nbytes > size:
            raise WasmError(f"range {ptr}+{nbytes} is outside linear memory ({size} bytes)")
        # Re-read every time: growing memory may move it.
        window = memoryview(self.memory.get_buffer_ptr(self.store, nbytes, ptr))  # no copy
        return np.frombuffer(window, dtype=np.uint8)

    def write(self, ptr: int, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        self._view(ptr, data.nbytes)[:] = data

    def read(self, ptr: int, count: int, dtype: type = np.float32) -> np.ndarray:
        nbytes = count * np.dtype(dtype).itemsize
        return self._view(ptr, nbytes).view(dtype).copy()


@dataclass(frozen=True)
class StepResult:
    loss: float
    correct: int


class WasmMLP:
    """An MLP (Linear/ReLU stack) held and trained inside ``kernels.wasm``."""

    def __init__(
        self,
        widths: Sequence[int],
        max_batch: int,
        *,
        limits: SandboxLimits | None = None,
        wasm: bytes | None = None,
        steps_per_call: int = STEPS_PER_CALL,
    ) -> None:
        if len(widths) < 2:
            raise ValueError("an MLP needs at least an input and an output width")
        self.widths = [int(w) for w in widths]
        self.max_batch = int(max_batch)
        if steps_per_call < 1:
            raise ValueError("steps_per_call must be at least 1")
        self.steps_per_call = int(steps_per_call)
        self._data: tuple[int, int, int, int] | None = None  # x, labels, order; capacity
        self._rows_loaded = 0
        self.sandbox = Sandbox(wasm if wasm is not None else MODULE_PATH.read_bytes(), limits)
        sb = self.sandbox
        sb.call("fm_reset")
        layers = len(self.widths) - 1
        widths_ptr = self._alloc(4 * len(self.widths))
        sb.write(widths_ptr, np.asarray(self.widths, dtype=np.int32))
        handle = int(sb.call("mlp_create", layers, widths_ptr, self.max_batch) or 0)
        if handle == 0:
            raise WasmError(
                f"out of module memory for widths {self.widths} and batch {self.max_batch} "
                f"(cap {sb.limits.memory_bytes} bytes)"
            )
        self.handle = handle
        self.num_params = int(sb.call("mlp_num_params", handle) or 0)
        self._ptr = {
            name: int(sb.call(f"mlp_{name}", handle) or 0)
            for name in ("params", "grads", "velocity", "anchor", "x", "labels")
        }
        self.names = [f"net.{2 * i}.{kind}" for i in range(layers) for kind in ("weight", "bias")]
        self.shapes: list[tuple[int, ...]] = []
        for w_in, w_out in zip(self.widths, self.widths[1:], strict=False):
            self.shapes += [(w_out, w_in), (w_out,)]

    def _alloc(self, nbytes: int) -> int:
        ptr = int(self.sandbox.call("fm_alloc", nbytes) or 0)
        if ptr == 0:
            raise WasmError(f"module memory cap reached allocating {nbytes} bytes")
        return ptr

    # -- weights ------------------------------------------------------------------------

    def _flat(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            value = np.asarray(tensors[name], dtype=np.float32)
            if value.shape != shape:
                raise ValueError(f"{name}: shape {value.shape}, expected {shape}")
            parts.append(value.reshape(-1))
        return np.concatenate(parts)

    def _unflat(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out, at = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = int(np.prod(shape))
            out[name] = flat[at : at + size].reshape(shape)
            at += size
        return out

    def set_weights(self, tensors: Mapping[str, np.ndarray]) -> None:
        self.sandbox.write(self._ptr["params"], self._flat(tensors))

    def set_anchor(self, tensors: Mapping[str, np.ndarray]) -> None:
        self.sandbox.write(self._ptr["anchor"], self._flat(tensors))

    def weights(self) -> dict[str, np.ndarray]:
        return self._unflat(self.sandbox.read(self._ptr["params"], self.num_params))

    def gradients(self) -> dict[str, np.ndarray]:
        return self._unflat(self.sandbox.read(self._ptr["grads"], self.num_params))

    def reset_momentum(self) -> None:
        self.sandbox.call("mlp_reset_velocity", self.handle)

    # -- steps --------------------------------------------------------------------------

    def _rows(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(y)
        xs = np.asarray(x, dtype=np.float32).reshape(n, -1 if n else self.widths[0])
        if xs.shape[1] != self.widths[0]:
            raise ValueError(f"rows of {xs.shape[1]} features; this model takes {self.widths[0]}")
        labels = np.asarray(y, dtype=np.int32)
        if n and (labels.min() < 0 or labels.max() >= self.widths[-1]):
            raise ValueError(f"labels must be within 0..{self.widths[-1] - 1}")
        return xs, labels

    def _load_batch(self, x: np.ndarray, y: np.ndarray) -> int:
        n = len(y)
        if not 0 < n <= self.max_batch:
            raise ValueError(f"batch of {n} rows; this model takes 1..{self.max_batch}")
        xs, labels = self._rows(x, y)
        self.sandbox.write(self._ptr["x"], xs)
        self.sandbox.write(self._ptr["labels"], labels)
        return n

    def forward_backward(self, x: np.ndarray, y: np.ndarray) -> StepResult:
        """Loss and gradients (``gradients()``) for one batch; the weights do not change."""
        n = self._load_batch(x, y)
        loss = float(self.sandbox.call("mlp_forward_backward", self.handle, n) or 0.0)
        return StepResult(loss, int(self.sandbox.call("mlp_correct", self.handle) or 0))

    def train_step(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        proximal_mu: float = 0.0,
    ) -> StepResult:
        """One SGD step (torch.optim.SGD's rule) on one batch; FedProx pulls towards the
        anchor (``set_anchor``) when ``proximal_mu > 0``."""
        n = self._load_batch(x, y)
        loss = self.sandbox.call(
            "mlp_train_step",
            self.handle,
            n,
            float(lr),
            float(momentum),
            float(weight_decay),
            float(proximal_mu),
            int(proximal_mu > 0),
        )
        return StepResult(
            float(loss or 0.0), int(self.sandbox.call("mlp_correct", self.handle) or 0)
        )

    # -- whole epochs -------------------------------------------------------------------

    def load_data(self, x: np.ndarray, y: np.ndarray) -> None:
        """Copy a data set into module memory for ``train_epoch``. The module's allocator
        does not free: a later, larger data set takes new memory (within the cap)."""
        xs, labels = self._rows(x, y)
        rows = len(labels)
        if self._data is None or self._data[3] < rows:
            self._data = (
                self._alloc(max(xs.nbytes, 4)),
                self._alloc(max(labels.nbytes, 4)),
                self._alloc(max(4 * rows, 4)),
                rows,
            )
        if rows:
            self.sandbox.write(self._data[0], xs)
            self.sandbox.write(self._data[1], labels)
        self._rows_loaded = rows

    def train_epoch(
        self,
        order: np.ndarray,
        *,
        batch_size: int,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        proximal_mu: float = 0.0,
    ) -> StepResult:
        """SGD over rows ``order`` of the loaded data, ``batch_size`` at a time (the last
        batch may be shorter): what ``train_step`` on ``x[order[i:i + batch_size]]`` does
        batch after batch, in ``steps_per_call`` steps per exported call. Returns the mean
        loss over the rows and the rows predicted right (before each step's update)."""
        if self._data is None:
            raise WasmError("no data loaded: call load_data first")
        if not 0 < batch_size <= self.max_batch:
            raise ValueError(f"batch of {batch_size} rows; this model takes 1..{self.max_batch}")
        x_ptr, y_ptr, order_ptr, capacity = self._data
        rows = self._rows_loaded
        idx = np.asarray(order, dtype=np.int64).reshape(-1)
        count = len(idx)
        if count > capacity:
            raise ValueError(f"{count} indices; one epoch takes at most {capacity}")
        if count and (idx.min() < 0 or idx.max() >= rows):
            raise ValueError(f"order must index the {rows} loaded rows")
        if count == 0:
            return StepResult(float("nan"), 0)
        self.sandbox.write(order_ptr, idx.astype(np.int32))
        chunk = batch_size * self.steps_per_call
        loss_sum, correct = 0.0, 0
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            out = float(
                self.sandbox.call(
                    "mlp_train_steps",
                    self.handle,
                    x_ptr,
                    y_ptr,
                    rows,
                    order_ptr + 4 * start,
                    n,
                    batch_size,
                    float(lr),
                    float(momentum),
                    float(weight_decay),
                    float(proximal_mu),
                    int(proximal_mu > 0),
                )
                or 0.0
            )
            if out < 0:
                raise WasmError("mlp_train_steps refused its arguments")
            loss_sum += out
            correct += int(self.sandbox.call("mlp_correct", self.handle) or 0)
        return StepResult(loss_sum / count, correct)
