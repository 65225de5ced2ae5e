"""WASM device benchmark: time per local training step of the device MLP, four ways.

Paper 1 (WASM on device and edge cloud) runs device training in WebAssembly and says it runs
near native speed. This measures how near, for one SGD-with-momentum step (forward, softmax
cross-entropy, backward, update) of the digits MLP (64-128-10, batch 32) and a wider one
(784-256-10, batch 64):

- WASM: ``devices/wasm/kernels.wasm`` in wasmtime, as a ``--runtime wasm`` device runs it
  (time limit by epoch interruption, the batch copied into linear memory each step); also
  the kernel call alone (batch already in memory) under each runaway-loop guard: epoch
  interruption, fuel metering, none;
- native C: the same ``kernels.c`` built with clang -O3 for this CPU's baseline (x86-64,
  no -march), called through ctypes;
- NumPy: the same step written in float32 NumPy;
- PyTorch CPU: ``train_local``'s inner loop (module forward, F.cross_entropy, backward,
  torch.optim.SGD step).

One process pinned to one core, ``torch.set_num_threads(1)``, BLAS limited to one thread;
each figure is the best of 7 blocks of steps.

    .venv/bin/python benchmarks/wasm_step.py          # writes docs + results JSON
    .venv/bin/python benchmarks/wasm_step.py --quick  # fewer steps, prints only
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _report import machine, publish
from threadpoolctl import threadpool_limits

from devices.wasm import SOURCE_PATH
from devices.wasm_runtime import SandboxLimits, WasmMLP
from learning.models import MLP, MLPConfig

# name -> (widths, batch, steps per timed block)
CASES = {
    "digits MLP 64-128-10, batch 32": ([64, 128, 10], 32, 300),
    "MLP 784-256-10, batch 64": ([784, 256, 10], 64, 30),
}
LR, MOMENTUM = 0.05, 0.9


def _time(step: Callable[[], object], steps: int, blocks: int = 7) -> float:
    """Seconds per step: the fastest of ``blocks`` blocks of ``steps`` steps (after a warm-up;
    the least disturbed block, on a machine shared with other work)."""
    for _ in range(max(steps // 10, 3)):
        step()
    per = []
    for _ in range(blocks):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        per.append((time.perf_counter() - started) / steps)
    return min(per)


def _kernel_call(wasm: WasmMLP, batch: int) -> Callable[[], object]:
    sandbox, handle = wasm.sandbox, wasm.handle
    return lambda: sandbox.call("mlp_train_step", handle, batch, LR, MOMENTUM, 0.0, 0.0, 0)


def _native_library(tmp: Path) -> ctypes.CDLL | None:
    clang = shutil.which("clang")
    if clang is None:
        return None
    lib = tmp / "kernels.so"
    subprocess.run([clang, "-O3", "-shared", "-fPIC", "-o", str(lib), str(SOURCE_PATH)], check=True)
    c = ctypes.CDLL(str(lib))
    c.fm_alloc.restype = c.mlp_create.restype = ctypes.c_void_p
    for name in ("mlp_params", "mlp_x", "mlp_labels"):
        getattr(c, name).restype = ctypes.c_void_p
        getattr(c, name).argtypes = [ctypes.c_void_p]
    c.mlp_create.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    c.mlp_train_step.restype = ctypes.c_double
    c.mlp_train_step.argtypes = (
        [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_float] * 4 + [ctypes.c_int]
    )
    return c


def _native_step(c: ctypes.CDLL, widths: list[int], batch: int, model: MLP, x, y) -> Callable:
    c.fm_reset()
    w = np.asarray(widths, dtype=np.int32)
    handle = c.mlp_create(len(widths) - 1, w.ctypes.data, batch)
    flat = np.concatenate([v.detach().numpy().ravel() for v in model.state_dict().values()])
    ctypes.memmove(c.mlp_params(handle), flat.ctypes.data, flat.nbytes)
    ctypes.memmove(c.mlp_x(handle), x.ctypes.data, x.nbytes)
    labels = y.astype(np.int32)
    ctypes.memmove(c.mlp_labels(handle), labels.ctypes.data, labels.nbytes)
    return lambda: c.mlp_train_step(handle, batch, LR, MOMENTUM, 0.0, 0.0, 0)


def _numpy_step(model: MLP, x: np.ndarray, y: np.ndarray) -> Callable[[], float]:
    params = [v.detach().numpy().copy() for v in model.state_dict().values()]
    velocity = [np.zeros_like(p) for p in params]
    n = len(y)

    def step() -> float:
        acts, h = [x], x
        layers = len(params) // 2
        for i in range(layers):
            h = h @ params[2 * i].T + params[2 * i + 1]
            if i + 1 < layers:
                h = np.maximum(h, 0.0)
            acts.append(h)
        m = h.max(axis=1, keepdims=True)
        e = np.exp(h - m)
        s = e.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(s[:, 0]) + m[:, 0] - h[np.arange(n), y]))
        dz = e / s
        dz[np.arange(n), y] -= 1.0
        dz /= n
        for i in reversed(range(layers)):
            gw, gb = dz.T @ acts[i], dz.sum(axis=0)
            if i > 0:
                dz = (dz @ params[2 * i]) * (acts[i] > 0)
            for j, g in ((2 * i, gw), (2 * i + 1, gb)):
                velocity[j] *= MOMENTUM
                velocity[j] += g
                params[j] -= LR * velocity[j]
        return loss

    return step


def _torch_step(model: MLP, x: np.ndarray, y: np.ndarray) -> Callable[[], float]:
    xs, ys = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.int64)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step() -> float:
        loss = F.cross_entropy(model(xs), ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def measure(widths: list[int], batch: int, steps: int, native: ctypes.CDLL | None) -> dict:
    torch.manual_seed(0)
    model = MLP(MLPConfig(widths[0], tuple(widths[1:-1]), widths[-1]))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, widths[0])).astype(np.float32)
    y = rng.integers(0, widths[-1], size=batch)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out: dict[str, float] = {}
    wasm = WasmMLP(widths, batch)
    wasm.set_weights(state)
    out["wasm"] = _time(lambda: wasm.train_step(x, y, lr=LR, momentum=MOMENTUM), steps)
    for key, limits in (
        ("wasm_kernel", None),
        ("wasm_kernel_fuel", SandboxLimits(time_limit_s=None, fuel_per_call=10**10)),
        ("wasm_kernel_free", SandboxLimits(time_limit_s=None)),
    ):
        other = WasmMLP(widths, batch, limits=limits)
        other.set_weights(state)
        other.train_step(x, y, lr=LR, momentum=MOMENTUM)  # the batch is now in its memory
        out[key] = _time(_kernel_call(other, batch), steps)
    if native is not None:
        out["native_c"] = _time(_native_step(native, widths, batch, model, x, y), steps)
    out["numpy"] = _time(_numpy_step(model, x, y), steps)
    out["torch"] = _time(_torch_step(model, x, y), steps)
    return out


LABELS = {
    "wasm": "WASM as a device runs it (wasmtime, time limit, batch copy-in)",
    "wasm_kernel": "WASM kernel call only (time limit: epoch interruption)",
    "wasm_kernel_fuel": "WASM kernel call only (fuel metering instead)",
    "wasm_kernel_free": "WASM kernel call only (no limit at all)",
    "native_c": "same C, native (clang -O3, ctypes)",
    "numpy": "NumPy float32",
    "torch": "PyTorch CPU (train_local's loop)",
}


def render(results: dict[str, dict[str, float]], info: dict[str, Any]) -> str:
    names = list(results)
    lines = [
        "## WASM device step",
        "",
        f"wasmtime {info.get('wasmtime')}, {info.get('clang')}.",
        "",
        "Time per local training step (forward, softmax cross-entropy, backward, SGD with "
        "momentum) of the device MLP, one core, best of 7 blocks "
        "(`benchmarks/wasm_step.py`). Ratios are to the native build of the same C source "
        "and to PyTorch CPU.",
        "",
        "| implementation | "
        + " | ".join(f"{n}: µs/step (x native, x PyTorch)" for n in names)
        + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, label in LABELS.items():
        cells = []
        for n in names:
            r = results[n]
            if key not in r:
                cells.append("n/a")
                continue
            native = r.get("native_c")
            ratio_native = f"{r[key] / native:.2f}" if native else "n/a"
            cells.append(f"{r[key] * 1e6:.0f} ({ratio_native}, {r[key] / r['torch']:.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "How near native: compare the WASM rows with the native build of the same C "
        "(the kernel-only rows leave out the copies of the batch). The kernel-only rows "
        "also show what each runaway-loop guard costs against none: epoch interruption "
        "(the default) or fuel. The C kernels are plain loop nests (no cache blocking), "
        "while NumPy and PyTorch call an optimised BLAS GEMM, which pays off as the layers "
        "widen; PyTorch's per-step framework overhead (autograd, optimizer) dominates for "
        "the small digits model.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, print only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        with tempfile.TemporaryDirectory() as tmp, threadpool_limits(1):
            native = _native_library(Path(tmp))
            results = {
                name: measure(widths, batch, max(steps // 10, 3) if args.quick else steps, native)
                for name, (widths, batch, steps) in CASES.items()
            }
    finally:
        os.sched_setaffinity(0, cores)
    info = machine()
    info["wasmtime"] = _package_version("wasmtime")
    info["clang"] = _clang_version()
    table = render(results, info)
    print(table)
    if not args.quick:
        publish("wasm-step", table, {"seconds_per_step": results, "machine": info})
    return 0


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _clang_version() -> str | None:
    clang = shutil.which("clang")
    if clang is None:
        return None
    first = subprocess.run([clang, "--version"], capture_output=True, text=True).stdout
    return first.splitlines()[0] if first else None


if __name__ == "__main__":
    sys.exit(main())
