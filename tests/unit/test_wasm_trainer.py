"""A ``--runtime wasm`` device trains what a PyTorch device trains: same partition, same
batches in the same order, same update rule; the trained weights and metrics agree."""

from __future__ import annotations

import numpy as np
import pytest

from devices.config import DeviceConfig, TrainingConfig, TrainSettings
from devices.local import LocalTrainer
from devices.wasm_trainer import WasmTrainer
from learning.params import to_numpy


def test_a_wasm_round_matches_a_pytorch_round() -> None:
    config = DeviceConfig(run_id="r", client_index=1, num_clients=5)
    torch_dev, wasm_dev = LocalTrainer.from_config(config), WasmTrainer.from_config(config)
    start = to_numpy(torch_dev.model)
    settings = TrainSettings(epochs=2, batch_size=16, weight_decay=1e-4)
    expected, em = torch_dev.train(start, 3, settings)
    got, gm = wasm_dev.train(start, 3, settings)
    assert list(got) == list(expected)
    for name, w in expected.items():
        scale = float(np.abs(w).max())
        assert float(np.abs(got[name] - w).max()) <= 1e-5 * scale, name
    assert gm["accuracy"] == em["accuracy"]
    assert gm["loss"] == pytest.approx(em["loss"], rel=1e-5)
    update = wasm_dev.step(start, 0, 3, settings)  # and the update is encoded as usual
    assert update.num_samples == wasm_dev.num_samples and update.encoding == "bf16"


def test_only_mlps_run_in_wasm() -> None:
    config = DeviceConfig(
        run_id="r", client_index=0, num_clients=5, training=TrainingConfig(model="cnn")
    )
    with pytest.raises(ValueError, match="trains MLPs only"):
        WasmTrainer.from_config(config)


def test_runtime_is_checked() -> None:
    with pytest.raises(ValueError, match="runtime"):
        TrainingConfig(runtime="jvm")  # type: ignore[arg-type]
