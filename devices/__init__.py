"""The device SDK: a ``FederatedClient`` on the Bus, its local trainer, and ``run_device``.

- ``devices.config``: ``DeviceConfig`` (run and own partition) with its parts
  ``WireConfig`` (broker or gateway, identity, timings), ``TrainingConfig`` (data, model,
  encoding, runtime) and ``SimulatedBehaviour`` (a fleet's slow, dropping or late devices),
  and ``TrainSettings`` (overridable per round by ``train_config``);
- ``devices.local``: ``LocalTrainer``, the pure step (train with the replica's seeding,
  delta, error feedback for int8/top-k, encode against the announced version);
- ``devices.store``: ``ModelStore``, global model versions from chunks (checked, decoded);
- ``devices.wire``: the device's side of the wire conventions as plain functions;
- ``devices.client``: ``FederatedClient``; ``devices.run``: ``run_device`` (``fedmq device``).
- ``devices.wasm_runtime``: the wasmtime sandbox and ``WasmMLP`` over ``devices/wasm``'s
  kernels; ``devices.wasm_trainer``: ``WasmTrainer``, the trainer of ``runtime="wasm"``.

Names are imported lazily so that ``devices.config`` does not load torch.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "DeviceConfig": "devices.config",
    "SimulatedBehaviour": "devices.config",
    "TrainingConfig": "devices.config",
    "TrainSettings": "devices.config",
    "WireConfig": "devices.config",
    "LocalTrainer": "devices.local",
    "LocalUpdate": "devices.local",
    "FederatedClient": "devices.client",
    "SentUpdate": "devices.wire",
    "run_device": "devices.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(module), name)
