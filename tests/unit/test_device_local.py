"""The device's local step: the replica's seeding, delta blobs, error feedback."""

from __future__ import annotations

import numpy as np
import pytest

from devices.config import DeviceConfig, TrainingConfig, TrainSettings
from devices.local import LocalTrainer
from learning.params import Arrays, delta, load_numpy, to_numpy
from learning.replica import ReplicaConfig, client_seed, federation_data, initial_model
from learning.train import train_local
from protocol.codec import apply_delta, decode

K, k = 3, 1


@pytest.fixture(scope="module")
def config() -> DeviceConfig:
    return DeviceConfig(
        run_id="run1", client_index=k, num_clients=K, training=TrainingConfig(seed=0)
    )


@pytest.fixture(scope="module")
def base(config: DeviceConfig) -> LocalTrainer:
    return LocalTrainer.from_config(config)


@pytest.fixture(scope="module")
def global0(base: LocalTrainer) -> Arrays:
    return to_numpy(base.model)


def _trainer(base: LocalTrainer, encoding: str = "bf16") -> LocalTrainer:
    """A fresh trainer (own error feedback) on the same model and partition."""
    return LocalTrainer(
        base.model, base.x, base.y, client_index=k, encoding=encoding, topk_fraction=0.05
    )


def _direct(weights: Arrays, round_number: int) -> Arrays:
    """What learning.replica trains for client k in this round."""
    rc = ReplicaConfig(clients=K)
    data, parts = federation_data(rc)
    model = initial_model(rc, data)
    load_numpy(model, weights)
    idx = parts[k]
    train_local(
        model,
        data.x_train[idx],
        data.y_train[idx],
        epochs=rc.local_epochs,
        batch_size=rc.batch_size,
        lr=rc.lr,
        momentum=rc.momentum,
        seed=client_seed(rc.seed, round_number, k),
    )
    return to_numpy(model)


def test_bf16_delta_matches_direct_training(base: LocalTrainer, global0: Arrays) -> None:
    trainer = _trainer(base)
    upd = trainer.step(global0, model_version=7, round_number=2, settings=TrainSettings())
    decoded = decode(upd.blob)
    assert decoded.delta and decoded.base_version == "7" and upd.encoding == "bf16"
    applied = apply_delta(global0, decoded, base_version="7")
    direct = _direct(global0, 2)
    for name, w in direct.items():
        d = w - global0[name]
        assert np.all(np.abs(applied[name] - w) <= np.abs(d) / 128 + 1e-7), name
    assert trainer.feedback is None  # bf16: no error feedback
    assert upd.num_samples == len(trainer.y) > 0
    assert set(upd.metrics) >= {"loss", "accuracy", "train_time_s"}


def test_overrides_change_training(base: LocalTrainer, global0: Arrays) -> None:
    settings = TrainSettings().with_overrides({"epochs": 2, "lr": 0.01, "attempt": 1})
    assert (settings.epochs, settings.lr, settings.batch_size) == (2, 0.01, 32)
    trainer = _trainer(base)
    a = trainer.step(global0, 0, 1, TrainSettings()).sent_delta
    b = trainer.step(global0, 0, 1, settings).sent_delta
    assert any(not np.allclose(a[n], b[n]) for n in a)


@pytest.mark.parametrize("encoding", ["int8", "topk"])
def test_error_feedback_carries_the_residual(
    base: LocalTrainer, global0: Arrays, encoding: str
) -> None:
    trainer = _trainer(base, encoding)
    assert trainer.feedback is not None
    settings = TrainSettings()
    trained1, _ = trainer.train(global0, 1, settings)
    d1 = delta(trained1, global0)
    _, sent1 = trainer.encode_delta(d1, 0)
    e1 = {n: r.copy() for n, r in trainer.feedback.residual.items()}
    assert trainer.residual_norm() > 0  # the lossy encoding dropped something
    for n in d1:
        np.testing.assert_allclose(e1[n], d1[n] - sent1[n], atol=1e-6)

    global1 = {n: global0[n] + sent1[n] for n in global0}
    trained2, _ = trainer.train(global1, 2, settings)
    d2 = delta(trained2, global1)
    blob2, sent2 = trainer.encode_delta(d2, 1)
    assert decode(blob2).base_version == "1" and decode(blob2).encoding == encoding
    # What was sent plus what is still owed is exactly what was trained: nothing lost.
    for n in d1:
        np.testing.assert_allclose(
            sent1[n] + sent2[n] + trainer.feedback.residual[n], d1[n] + d2[n], atol=1e-5
        )
    # The residual of round 1 was added to round 2's update.
    n0 = next(iter(d2))
    without_feedback = _trainer(base, encoding).encode_delta(d2, 1)[1]
    assert not np.allclose(sent2[n0], without_feedback[n0])
