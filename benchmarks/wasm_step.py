"""WASM device benchmark: time per local training step of the device MLP, against the same C
built natively, NumPy and PyTorch.

Paper 1 (WASM on device and edge cloud) runs device training in WebAssembly and says it runs
near native speed. This measures how near, for SGD-with-momentum steps (forward, softmax
cross-entropy, backward, update) of the digits MLP (64-128-10, batch 32, the digits training
set) and a wider one (784-256-10, batch 64, random data), one local epoch at a time with a
fresh shuffle each epoch:

- WASM: ``devices/wasm/kernels.wasm`` in wasmtime as a ``--runtime wasm`` device runs it
  (``WasmMLP.train_epoch``: data in module memory, 64 steps per exported call, time limit by
  epoch interruption); the same with fuel metering, with no guard at all, and the old path
  (one exported call per step, each batch copied in);
- native C: the same ``kernels.c`` built with gcc and with clang, ``-O3 -march=native``, as a
  shared library called through ctypes (same 64 steps per call); the target's reference is
  the faster of the two;
- NumPy: the same step in float32 NumPy (BLAS GEMM), batches gathered with fancy indexing;
- PyTorch CPU: ``train_local``'s inner loop (module forward, F.cross_entropy, backward,
  torch.optim.SGD step).

Each implementation runs in its own process (in a probe, GCC's AVX code run in the same
process as wasmtime slowed the WASM step up to 10x, so they must not share one), all pinned
to one core, BLAS and torch limited to one thread. The parent interleaves them: each round
times one block of epochs of every implementation, in a rotated order, and a figure is the
median over rounds, so that load from other work on the machine falls on all alike.

    .venv/bin/python benchmarks/wasm_step.py          # writes docs + results JSON
    .venv/bin/python benchmarks/wasm_step.py --quick  # fewer rounds, prints only
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from _report import machine, publish

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # spawned workers import this file as a plain module
    sys.path.insert(0, str(ROOT))

from devices.wasm import SOURCE_PATH  # noqa: E402
from devices.wasm_runtime import STEPS_PER_CALL, SandboxLimits, WasmMLP  # noqa: E402

LR, MOMENTUM = 0.05, 0.9
NATIVE_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
TARGET_NATIVE, TARGET_NUMPY = 1.5, 1.0


@dataclass(frozen=True)
class Case:
    name: str
    widths: tuple[int, ...]
    batch: int
    epochs_per_block: int  # one timed block: about 20-100 ms of WASM steps
    rows: int | None = None  # None: the digits training set; else random rows


CASES = (
    Case("digits MLP 64-128-10, batch 32", (64, 128, 10), 32, 8),
    Case("MLP 784-256-10, batch 64", (784, 256, 10), 64, 1, rows=1024),
)

LABELS = {
    "wasm": "WASM as a device runs it (wasmtime, epoch time limit, 64 steps per call)",
    "wasm_fuel": "WASM, fuel metering instead of the time limit",
    "wasm_free": "WASM, no runaway guard at all",
    "wasm_per_step": "WASM, one call per step, batch copied in (the old path)",
    "native_gcc": "same C, native: gcc -O3 -march=native (ctypes)",
    "native_clang": "same C, native: clang -O3 -march=native (ctypes)",
    "nofma_gcc": "same C, native gcc, no FMA contraction (-ffp-contract=off), as WASM",
    "numpy": "NumPy float32 (BLAS)",
    "torch": "PyTorch CPU (train_local's loop)",
}


def _data(case: Case) -> tuple[np.ndarray, np.ndarray]:
    if case.rows is None:
        from learning.data.datasets import digits

        data = digits(seed=0)
        rows = len(data.y_train)
        x = np.ascontiguousarray(data.x_train, dtype=np.float32).reshape(rows, -1)
        return x, np.asarray(data.y_train, dtype=np.int32)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(case.rows, case.widths[0])).astype(np.float32)
    return x, rng.integers(0, case.widths[-1], size=case.rows).astype(np.int32)


def _initial_state(case: Case) -> dict[str, np.ndarray]:
    import torch

    from learning.models import MLP, MLPConfig

    torch.manual_seed(0)
    w = case.widths
    model = MLP(MLPConfig(w[0], tuple(w[1:-1]), w[-1]))
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


Epoch = Callable[[np.ndarray], int]  # runs one epoch in the given order; returns its steps


def _wasm_epoch(case: Case, x: np.ndarray, y: np.ndarray, limits: SandboxLimits | None) -> Epoch:
    wasm = WasmMLP(list(case.widths), case.batch, limits=limits)
    wasm.set_weights(_initial_state(case))
    wasm.load_data(x, y)

    def epoch(order: np.ndarray) -> int:
        wasm.train_epoch(order, batch_size=case.batch, lr=LR, momentum=MOMENTUM)
        return -(-len(order) // case.batch)

    return epoch


def _wasm_per_step(case: Case, x: np.ndarray, y: np.ndarray) -> Epoch:
    wasm = WasmMLP(list(case.widths), case.batch)
    wasm.set_weights(_initial_state(case))

    def epoch(order: np.ndarray) -> int:
        steps = 0
        for start in range(0, len(order), case.batch):
            idx = order[start : start + case.batch]
            wasm.train_step(x[idx], y[idx], lr=LR, momentum=MOMENTUM)
            steps += 1
        return steps

    return epoch


def _native_epoch(case: Case, x: np.ndarray, y: np.ndarray, lib_path: Path) -> Epoch:
    c = ctypes.CDLL(str(lib_path))
    ptr = ctypes.c_void_p
    c.fm_alloc.restype = c.mlp_create.restype = c.mlp_params.restype = ptr
    c.mlp_create.argtypes = [ctypes.c_int, ptr, ctypes.c_int]
    c.mlp_params.argtypes = [ptr]
    c.mlp_train_steps.restype = ctypes.c_double
    c.mlp_train_steps.argtypes = [ptr, ptr, ptr, ctypes.c_int, ptr, ctypes.c_int, ctypes.c_int]
    c.mlp_train_steps.argtypes += [ctypes.c_float] * 4 + [ctypes.c_int]
    c.fm_reset()
    widths = np.asarray(case.widths, dtype=np.int32)
    handle = c.mlp_create(len(widths) - 1, widths.ctypes.data, case.batch)
    flat = np.concatenate([v.ravel() for v in _initial_state(case).values()])
    ctypes.memmove(c.mlp_params(handle), flat.ctypes.data, flat.nbytes)
    xs, ys = np.ascontiguousarray(x), np.ascontiguousarray(y)
    chunk = case.batch * STEPS_PER_CALL

    def epoch(order: np.ndarray) -> int:
        idx = np.ascontiguousarray(order, dtype=np.int32)
        for start in range(0, len(idx), chunk):
            n = min(chunk, len(idx) - start)
            loss = c.mlp_train_steps(
                handle, xs.ctypes.data, ys.ctypes.data, len(ys),
                idx.ctypes.data + 4 * start, n, case.batch, LR, MOMENTUM, 0.0, 0.0, 0,
            )  # fmt: skip
            if loss < 0:
                raise RuntimeError("native mlp_train_steps refused its arguments")
        return -(-len(idx) // case.batch)

    return epoch


def _numpy_epoch(case: Case, x: np.ndarray, y: np.ndarray) -> Epoch:
    params = list(_initial_state(case).values())
    velocity = [np.zeros_like(p) for p in params]
    layers = len(params) // 2

    def step(xb: np.ndarray, yb: np.ndarray) -> float:
        n = len(yb)
        acts, h = [xb], xb
        for i in range(layers):
            h = h @ params[2 * i].T + params[2 * i + 1]
            if i + 1 < layers:
                h = np.maximum(h, 0.0)
            acts.append(h)
        m = h.max(axis=1, keepdims=True)
        e = np.exp(h - m)
        s = e.sum(axis=1, keepdims=True)
        rows = np.arange(n)
        loss = float(np.mean(np.log(s[:, 0]) + m[:, 0] - h[rows, yb]))
        dz = e / s
        dz[rows, yb] -= 1.0
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

    def epoch(order: np.ndarray) -> int:
        steps = 0
        for start in range(0, len(order), case.batch):
            idx = order[start : start + case.batch]
            step(x[idx], y[idx])
            steps += 1
        return steps

    return epoch


def _torch_epoch(case: Case, x: np.ndarray, y: np.ndarray) -> Epoch:
    import torch
    import torch.nn.functional as F

    from learning.models import MLP, MLPConfig

    w = case.widths
    model = MLP(MLPConfig(w[0], tuple(w[1:-1]), w[-1]))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in _initial_state(case).items()})
    xs, ys = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.int64)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def epoch(order: np.ndarray) -> int:
        idx_all = torch.as_tensor(order)
        steps = 0
        for start in range(0, len(order), case.batch):
            idx = idx_all[start : start + case.batch]
            loss = F.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        return steps

    return epoch


def _is_native(impl: str) -> bool:
    return impl.startswith(("native_", "nofma_"))


def _runner(impl: str, case: Case, libs: dict[str, Path]) -> Epoch:
    x, y = _data(case)
    if impl == "wasm":
        return _wasm_epoch(case, x, y, None)
    if impl == "wasm_fuel":
        return _wasm_epoch(case, x, y, SandboxLimits(time_limit_s=None, fuel_per_call=10**12))
    if impl == "wasm_free":
        return _wasm_epoch(case, x, y, SandboxLimits(time_limit_s=None))
    if impl == "wasm_per_step":
        return _wasm_per_step(case, x, y)
    if _is_native(impl):
        return _native_epoch(case, x, y, libs[impl])
    if impl == "numpy":
        return _numpy_epoch(case, x, y)
    if impl == "torch":
        return _torch_epoch(case, x, y)
    raise ValueError(impl)


def _worker(conn: Connection, impl: str, case: Case, libs: dict[str, Path], core: int) -> None:
    os.sched_setaffinity(0, {core})
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(1):
        epoch = _runner(impl, case, libs)
        rows = len(_data(case)[1])
        shuffle = np.random.default_rng(1)
        for _ in range(2):  # warm-up: compiled code, caches, allocator
            epoch(shuffle.permutation(rows).astype(np.int32))
        conn.send("ready")
        while conn.recv():
            # The same sequence of orders for every implementation.
            orders = [
                shuffle.permutation(rows).astype(np.int32) for _ in range(case.epochs_per_block)
            ]
            # CPU time of this thread (every implementation computes in its calling thread,
            # one BLAS/torch thread): time spent descheduled by other work is not counted.
            started = time.thread_time()
            steps = sum(epoch(order) for order in orders)
            conn.send((time.thread_time() - started) / steps)


def _build_native(tmp: Path) -> dict[str, Path]:
    libs = {}
    builds = [
        ("native_gcc", "gcc", []),
        ("native_clang", "clang", []),
        # WebAssembly SIMD128 has no fused multiply-add (relaxed SIMD's needs a newer
        # clang): this build does the same separate multiplies and adds as the module.
        ("nofma_gcc", "gcc", ["-ffp-contract=off"]),
    ]
    for key, compiler, extra in builds:
        exe = shutil.which(compiler)
        if exe is None:
            continue
        lib = tmp / f"kernels-{key}.so"
        cmd = [exe, *NATIVE_FLAGS, *extra, "-o", str(lib), str(SOURCE_PATH)]
        subprocess.run(cmd, check=True)
        libs[key] = lib
    return libs


def measure(
    case: Case, rounds: int, libs: dict[str, Path], only: list[str] | None = None
) -> dict[str, list[float]]:
    """Seconds per step of every implementation, one figure per round."""
    ctx = mp.get_context("spawn")
    core = min(os.sched_getaffinity(0))
    impls = [k for k in LABELS if not _is_native(k) or k in libs]
    impls = [k for k in impls if not only or k in only]
    workers: dict[str, tuple[Any, Connection]] = {}
    try:
        for impl in impls:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, impl, case, libs, core), daemon=True)
            proc.start()
            workers[impl] = (proc, parent)
        for _, conn in workers.values():
            if conn.recv() != "ready":
                raise RuntimeError("a worker failed to start")
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for r in range(rounds):
            for impl in impls[r % len(impls) :] + impls[: r % len(impls)]:
                conn = workers[impl][1]
                conn.send(True)
                times[impl].append(float(conn.recv()))
        return times
    finally:
        for proc, conn in workers.values():
            with contextlib.suppress(OSError):
                conn.send(False)
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def _stats(samples: list[float]) -> dict[str, float]:
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(min(samples))}


def render(results: dict[str, dict[str, dict[str, float]]], info: dict[str, Any]) -> str:
    names = list(results)
    lines = [
        "## WASM device step",
        "",
        f"wasmtime {info.get('wasmtime')}; {info.get('clang')}; {info.get('gcc')}; "
        f"{info['rounds']} interleaved rounds.",
        "",
        "CPU time per local training step (forward, softmax cross-entropy, backward, SGD "
        "with momentum) of the device MLP, whole epochs with a fresh shuffle each, one core, "
        "each implementation in its own process, median over rounds that interleave all "
        "implementations (`benchmarks/wasm_step.py`; the machine is shared, so CPU time of "
        "the computing thread, not wall time); in brackets the ratio to the faster native "
        "build of the same C (gcc or clang, default flags), and to NumPy.",
        "",
        "| implementation | "
        + " | ".join(f"{n}: µs/step (x native, x NumPy)" for n in names)
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
            med = r[key]["median"]
            native = _native_ref(r)
            ratio = f"{med / r[native]['median']:.2f}" if native else "n/a"
            numpy = f"{med / r['numpy']['median']:.2f}" if "numpy" in r else "n/a"
            cells.append(f"{med * 1e6:.0f} ({ratio}, {numpy})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Targets (issue 21): the WASM step as a device runs it within "
        f"{TARGET_NATIVE}x of native C, and at least as fast as NumPy.",
    ]
    for n in names:
        r = results[n]
        native = _native_ref(r)
        if native is None or "wasm" not in r or "numpy" not in r:
            continue
        med = {k: v["median"] for k, v in r.items()}
        vs_native = med["wasm"] / med[native]
        vs_numpy = med["wasm"] / med["numpy"]
        line = (
            f"- {n}: WASM / native {vs_native:.2f} "
            f"({'met' if vs_native <= TARGET_NATIVE else 'missed'}); WASM / NumPy "
            f"{vs_numpy:.2f} ({'met' if vs_numpy <= TARGET_NUMPY else 'missed'})"
        )
        q = {k: (v["q1"] * 1e6, v["q3"] * 1e6) for k, v in r.items()}
        line += (
            f" (interquartile ranges over rounds: WASM {q['wasm'][0]:.0f}-{q['wasm'][1]:.0f}, "
            f"NumPy {q['numpy'][0]:.0f}-{q['numpy'][1]:.0f} µs)"
        )
        if {"wasm_free", "nofma_gcc", "native_gcc"} <= med.keys():
            # WASM / gcc factored into: guard x codegen (same vector code) x FMA contraction.
            line += (
                f". WASM / gcc = runaway guard {med['wasm'] / med['wasm_free']:.2f}"
                f" x Cranelift against gcc on the same vector code without FMA "
                f"{med['wasm_free'] / med['nofma_gcc']:.2f}"
                f" x gcc's FMA contraction {med['nofma_gcc'] / med['native_gcc']:.2f}"
            )
        if "wasm_fuel" in med and "wasm_free" in med:
            line += f"; fuel instead of the time limit: {med['wasm_fuel'] / med['wasm_free']:.2f}"
        if "wasm_per_step" in med:
            line += f"; one call per step: {med['wasm_per_step'] / med['wasm']:.2f}x the time"
        lines.append(line + ".")
    lines += [
        "",
        "Why (the factors above): WebAssembly SIMD128 has no fused multiply-add (relaxed "
        "SIMD's `f32x4.relaxed_madd` needs clang 16 or later; Debian's clang 14 emits "
        "pre-standard opcodes that wasmtime refuses), while gcc contracts `a * b + c` into "
        "FMA by default. wasmtime's runaway guard (epoch or fuel) checks at every loop "
        "header, and as the check's slow path is a call, Cranelift keeps the register "
        "tile's accumulators and the loop's integers on the stack across the loop; the "
        "tile's k loop is unrolled by three to pay that once per three steps, the guard "
        "itself once per 64 steps per call. Cranelift's code for the same vector source "
        "adds a 32-bit index and the heap base to every access and computes a loop body's "
        "arithmetic after all its loads, so the tile cannot be unrolled further without "
        "spilling x86's 16 vector registers (gcc with AVX-512 has 32). NumPy's BLAS runs "
        "AVX-512 FMA, 16 floats per instruction against WASM's 4 without FMA, and pulls "
        "ahead as the layers widen (the 784-256-10 column); on the digits MLP its per-call "
        "overhead dominates. The old path (one exported call per step, the batch copied "
        "in) shows what running whole epochs per call saves.",
    ]
    return "\n".join(lines)


def _native_ref(r: dict[str, dict[str, float]]) -> str | None:
    natives = [k for k in r if k.startswith("native_")]
    return min(natives, key=lambda k: r[k]["median"]) if natives else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, print only")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case")
    parser.add_argument("--only", nargs="*", help="these implementations only (print only)")
    parser.add_argument("--case", type=int, help="this case only (index; print only)")
    args = parser.parse_args()
    if args.only or args.case is not None:
        args.quick = True
    rounds = args.rounds or (4 if args.quick else 21)
    results: dict[str, dict[str, dict[str, float]]] = {}
    raw: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        libs = _build_native(Path(tmp))
        for i, case in enumerate(CASES):
            if args.case is not None and i != args.case:
                continue
            raw[case.name] = measure(case, rounds, libs, args.only)
            results[case.name] = {k: _stats(v) for k, v in raw[case.name].items()}
    info = machine()
    info.update(
        wasmtime=_package_version("wasmtime"),
        clang=_version_line("clang"),
        gcc=_version_line("gcc"),
        rounds=rounds,
        native_flags=" ".join(NATIVE_FLAGS),
        steps_per_call=STEPS_PER_CALL,
    )
    table = render(results, info)
    print(table)
    if not args.quick:
        publish(
            "wasm-step",
            table,
            {"seconds_per_step": results, "samples": raw, "machine": info},
        )
    return 0


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _version_line(compiler: str) -> str | None:
    exe = shutil.which(compiler)
    if exe is None:
        return None
    first = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return first.splitlines()[0] if first else None


if __name__ == "__main__":
    sys.exit(main())
