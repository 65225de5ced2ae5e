"""``WasmTrainer``: a device whose local training runs in WebAssembly (``--runtime wasm``).

Everything but the arithmetic is ``LocalTrainer``'s: the partition, the delta, its encoding
and error feedback. The arithmetic is ``devices/wasm/kernels.wasm`` in the wasmtime sandbox
of ``devices.wasm_runtime``, fed the very batches ``learning.train.train_local`` would use:
the shuffle order of each epoch is ``torch.randperm`` on a generator seeded with the round's
client seed, and the momentum buffer starts at zero every round (a fresh optimizer). So a
WASM device computes what a PyTorch device computes, up to float rounding. The partition is
copied into the module once; an epoch is then a few exported calls
(``WasmMLP.train_epoch``), the module gathering each batch itself.

Only ``learning.models.MLP`` (Linear/ReLU) models run here; others are refused at start.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from devices.config import DeviceConfig, TrainSettings
from devices.local import LocalTrainer
from devices.wasm_runtime import SandboxLimits, WasmMLP
from learning.models import MLP
from learning.params import Arrays, load_numpy, to_numpy
from learning.replica import client_seed


class WasmTrainer(LocalTrainer):
    def __init__(
        self,
        model: nn.Module,
        x: np.ndarray,
        y: np.ndarray,
        *,
        sandbox: SandboxLimits | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, x, y, **kwargs)
        if not isinstance(self.model, MLP):
            raise ValueError(f"the wasm runtime trains MLPs only, not {type(self.model).__name__}")
        c = self.model.config
        self.widths = [c.in_features, *c.hidden, c.num_classes]
        self.sandbox_limits = sandbox
        self._wasm: WasmMLP | None = None

    @classmethod
    def from_config(cls, config: DeviceConfig) -> WasmTrainer:
        base = LocalTrainer.from_config(config)
        return cls(
            base.model,
            base.x,
            base.y,
            **base.rebuild_args(),
        )

    def _module(self, batch_size: int) -> WasmMLP:
        if self._wasm is None or self._wasm.max_batch < batch_size:
            self._wasm = WasmMLP(self.widths, batch_size, limits=self.sandbox_limits)
            # The partition lives in module memory from now on: each epoch sends only its
            # shuffle order, and the module gathers the batches itself.
            n = self.num_samples
            self._wasm.load_data(
                np.ascontiguousarray(self.x, dtype=np.float32).reshape(n, self.widths[0]),
                np.asarray(self.y, dtype=np.int32),
            )
        return self._wasm

    def warm_up(self, batch: int = 8) -> float:
        """Instantiate the module (its compilation is the first-use cost here)."""
        started = time.perf_counter()
        self._module(batch)
        return time.perf_counter() - started

    def train(
        self, global_weights: Mapping[str, np.ndarray], round_number: int, settings: TrainSettings
    ) -> tuple[Arrays, dict[str, float]]:
        started = time.perf_counter()
        n, bs = self.num_samples, settings.batch_size
        wasm = self._module(bs)
        wasm.set_weights(global_weights)
        wasm.reset_momentum()
        if settings.proximal_mu > 0:
            wasm.set_anchor(global_weights)
        shuffle = torch.Generator().manual_seed(
            client_seed(self.seed, round_number, self.client_index)
        )
        loss_sum, correct = float("nan"), 0
        for _ in range(max(settings.epochs, 0) if n else 0):
            order = torch.randperm(n, generator=shuffle).numpy()
            step = wasm.train_epoch(
                order,
                batch_size=bs,
                lr=settings.lr,
                momentum=settings.momentum,
                weight_decay=settings.weight_decay,
                proximal_mu=settings.proximal_mu,
            )
            loss_sum, correct = step.loss * n, step.correct
        trained = wasm.weights() if n and settings.epochs > 0 else dict(global_weights)
        load_numpy(self.model, trained)  # the torch twin stays in step (spec, inspection)
        metrics = {
            "loss": loss_sum / n if n else float("nan"),
            "accuracy": correct / n if n else float("nan"),
            "train_time_s": time.perf_counter() - started,
        }
        return to_numpy(self.model), metrics
