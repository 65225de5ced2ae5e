"""Local training, evaluation, numpy parameters and error feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from learning.data import digits, synthetic
from learning.evaluate import evaluate
from learning.feedback import ErrorFeedback
from learning.models import build_model
from learning.params import apply_delta, delta, load_numpy, to_numpy
from learning.train import train_local


def _distance(model: nn.Module, ref: dict[str, np.ndarray]) -> float:
    return float(sum(np.sum((v - ref[k]) ** 2) for k, v in to_numpy(model).items()))


def test_centralized_digits_mlp_passes_90_percent_in_a_few_epochs() -> None:
    d = digits()
    model = build_model("mlp", input_shape=d.input_shape, seed=0)
    result = train_local(
        model, d.x_train, d.y_train, epochs=5, batch_size=32, lr=0.05, momentum=0.9, seed=0
    )
    assert result.num_samples == 1437 and result.accuracy > 0.9 and result.seconds > 0
    loss, accuracy = evaluate(model, d.x_test, d.y_test, batch_size=100)
    assert accuracy > 0.9 and loss < 0.5


def test_training_is_deterministic_for_a_seed_and_restores_the_global_generator() -> None:
    d = synthetic(num_samples=300, seed=0)
    start = to_numpy(build_model("mlp", input_shape=d.input_shape, seed=1))
    runs = []
    for seed in (7, 7, 8):
        model = build_model("mlp", input_shape=d.input_shape)
        load_numpy(model, start)
        state = torch.random.get_rng_state()
        train_local(model, d.x_train, d.y_train, epochs=2, batch_size=16, lr=0.1, seed=seed)
        assert torch.equal(state, torch.random.get_rng_state())
        runs.append(to_numpy(model))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in start)
    assert not all(np.array_equal(runs[0][k], runs[2][k]) for k in start)


def test_the_fedprox_term_keeps_the_weights_closer_to_the_global_model() -> None:
    d = synthetic(num_samples=300, seed=0)
    global_weights = to_numpy(build_model("mlp", input_shape=d.input_shape, seed=2))
    distances = []
    for mu in (0.0, 1.0):
        model = build_model("mlp", input_shape=d.input_shape)
        load_numpy(model, global_weights)
        train_local(
            model,
            d.x_train,
            d.y_train,
            epochs=3,
            batch_size=16,
            lr=0.1,
            momentum=0.9,
            proximal_mu=mu,
            global_params=global_weights,
            seed=0,
        )
        distances.append(_distance(model, global_weights))
    assert distances[1] < 0.7 * distances[0]


def test_evaluate_reports_loss_and_accuracy_and_restores_the_training_mode() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    loss, accuracy = evaluate(model.train(), x, np.array([0, 1, 1]), batch_size=2)
    assert accuracy == pytest.approx(2 / 3) and model.training
    assert loss == pytest.approx(np.log(1 + np.e) - 2 / 3, rel=1e-5)


def test_numpy_parameters_round_trip_with_integer_buffers_kept() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model(torch.randn(5, 3))  # moves the running stats and the counter
    arrays = to_numpy(model)
    assert arrays["1.num_batches_tracked"].dtype == np.int64
    assert arrays["0.weight"].dtype == np.float32
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    load_numpy(other, arrays)
    assert all(np.array_equal(v, to_numpy(other)[k]) for k, v in arrays.items())
    arrays["0.weight"] += 1.0  # a copy: the model is untouched
    assert not np.array_equal(arrays["0.weight"], to_numpy(model)["0.weight"])
    d = delta(arrays, to_numpy(model))
    assert np.allclose(d["0.weight"], 1.0) and int(d["1.num_batches_tracked"]) == 1
    restored = apply_delta(to_numpy(model), d)
    assert all(np.allclose(restored[k], arrays[k]) for k in arrays)
    with pytest.raises(KeyError, match="missing"):
        load_numpy(other, {"0.weight": arrays["0.weight"]})


def _top_k(arrays: dict[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    out = {}
    for name, a in arrays.items():
        k = max(1, int(a.size * fraction))
        keep = np.argsort(np.abs(a).ravel())[-k:]
        sparse = np.zeros(a.size, np.float32)
        sparse[keep] = a.ravel()[keep]
        out[name] = sparse.reshape(a.shape)
    return out


def test_error_feedback_keeps_the_sum_of_sent_top_k_deltas_near_the_true_sum() -> None:
    rng = np.random.default_rng(0)
    ef = ErrorFeedback()
    drift = rng.standard_normal(200).astype(np.float32) * 0.1
    true_sum, sent_sum, plain_sum = np.zeros(200), np.zeros(200), np.zeros(200)
    gaps = []
    for _ in range(300):
        d = {"w": drift + rng.standard_normal(200).astype(np.float32), "steps": np.array(3)}
        sent = ef.compensate(d)
        assert sent["steps"] == 3  # non-float tensors pass through
        decoded = _top_k({"w": sent["w"]}, 0.05)
        ef.update(decoded)
        true_sum += d["w"]
        sent_sum += decoded["w"]
        plain_sum += _top_k({"w": d["w"]}, 0.05)["w"]
        assert np.allclose(true_sum - sent_sum, ef.residual["w"], atol=1e-3)
        gaps.append(float(np.linalg.norm(true_sum - sent_sum)))
    assert max(gaps[150:]) < 1.5 * max(gaps[:150])  # bounded, not growing
    assert gaps[-1] < 0.25 * float(np.linalg.norm(true_sum - plain_sum))
    assert ef.residual_norm() == pytest.approx(gaps[-1], rel=1e-3)
