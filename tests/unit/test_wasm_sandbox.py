"""The wasmtime sandbox refuses what a device module must not do: import anything from the
host, loop forever, or grow its memory past the cap; each ends in a WasmError, not a crash."""

from __future__ import annotations

import time

import numpy as np
import pytest
import wasmtime

from devices.wasm_runtime import Sandbox, SandboxLimits, WasmError, WasmMLP


def _wasm(wat: str) -> bytes:
    return wasmtime.wat2wasm(wat)


def test_a_module_importing_a_host_function_is_refused() -> None:
    module = _wasm(
        '(module (import "env" "open" (func $open (param i32) (result i32)))'
        ' (func (export "f") (result i32) (call $open (i32.const 0))))'
    )
    with pytest.raises(WasmError, match=r"refused: it imports env\.open"):
        Sandbox(module)


def test_a_module_importing_memory_or_wasi_is_refused_too() -> None:
    module = _wasm(
        '(module (import "wasi_snapshot_preview1" "fd_write"'
        " (func (param i32 i32 i32 i32) (result i32)))"
        ' (import "env" "memory" (memory 1)))'
    )
    with pytest.raises(WasmError, match=r"wasi_snapshot_preview1\.fd_write, env\.memory"):
        Sandbox(module)


def test_a_runaway_loop_is_stopped_by_the_fuel_limit() -> None:
    module = _wasm('(module (func (export "spin") (loop $l (br $l))))')
    sandbox = Sandbox(module, SandboxLimits(time_limit_s=None, fuel_per_call=5_000_000))
    started = time.monotonic()
    with pytest.raises(WasmError, match="spin: stopped after 5000000 units of fuel"):
        sandbox.call("spin")
    assert time.monotonic() - started < 5
    with pytest.raises(WasmError, match="fuel"):  # every call gets the budget again
        sandbox.call("spin")


def test_a_runaway_loop_is_stopped_by_the_time_limit() -> None:
    module = _wasm('(module (func (export "spin") (loop $l (br $l))))')
    sandbox = Sandbox(module, SandboxLimits(time_limit_s=0.2))
    for _ in range(2):  # every call gets the limit again
        started = time.monotonic()
        with pytest.raises(WasmError, match=r"spin: stopped after its time limit of 0\.2 s"):
            sandbox.call("spin")
        assert 0.15 < time.monotonic() - started < 5


def test_memory_growth_beyond_the_cap_fails_cleanly() -> None:
    module = _wasm(
        '(module (memory (export "memory") 1)'
        ' (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0))))'
    )
    sandbox = Sandbox(module, SandboxLimits(memory_bytes=4 * 65536))
    assert sandbox.call("grow", 3) == 1  # to the cap: allowed, returns the old size
    assert sandbox.call("grow", 1) == -1  # one page past it: refused, no trap
    assert sandbox.memory is not None and sandbox.memory.size(sandbox.store) == 4


def test_the_kernels_report_out_of_memory_as_an_error() -> None:
    cap = 2 * 1024 * 1024
    with pytest.raises(WasmError, match="out of module memory"):
        WasmMLP([784, 1024, 10], max_batch=64, limits=SandboxLimits(memory_bytes=cap))
    small = WasmMLP([64, 128, 10], max_batch=32, limits=SandboxLimits(memory_bytes=cap))
    x = np.zeros((32, 64), dtype=np.float32)
    assert small.train_step(x, np.zeros(32, dtype=np.int32), lr=0.1).loss > 0


def test_instantiation_that_needs_more_than_the_cap_is_refused() -> None:
    module = _wasm('(module (memory (export "memory") 100))')
    with pytest.raises(WasmError, match="could not be instantiated"):
        Sandbox(module, SandboxLimits(memory_bytes=10 * 65536))


def test_out_of_bounds_copies_are_refused_on_the_host_side() -> None:
    wasm = WasmMLP([4, 3], max_batch=2)
    with pytest.raises(ValueError, match="batch of 3 rows"):
        wasm.train_step(np.zeros((3, 4), "f4"), np.zeros(3, "i4"), lr=0.1)
    with pytest.raises(ValueError, match=r"labels must be within 0\.\.2"):
        wasm.train_step(np.zeros((2, 4), "f4"), np.array([0, 3]), lr=0.1)
    with pytest.raises(ValueError, match="rows of 5 features"):
        wasm.train_step(np.zeros((2, 5), "f4"), np.array([0, 1]), lr=0.1)
    with pytest.raises(WasmError, match="outside linear memory"):
        wasm.sandbox.read(wasm.sandbox.memory.data_len(wasm.sandbox.store) - 4, 2)  # type: ignore[union-attr]


def test_invalid_bytes_are_refused() -> None:
    with pytest.raises(WasmError, match="invalid WebAssembly module"):
        Sandbox(b"\0asm\x01\0\0\0garbage")
