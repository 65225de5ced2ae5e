"""The device kernels in WebAssembly: ``kernels.c`` (the project's own C source) and
``kernels.wasm``, what ``scripts/build-wasm.sh`` builds from it. ``devices.wasm_runtime``
runs the module in a wasmtime sandbox; the gateway's browser device page loads the same
bytes."""

from pathlib import Path

SOURCE_PATH = Path(__file__).with_name("kernels.c")
MODULE_PATH = Path(__file__).with_name("kernels.wasm")
