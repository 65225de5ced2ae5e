"""The single-process FedAvg replica: the reference a federated run is compared against."""

from __future__ import annotations

import numpy as np
import pytest

from learning.data import load_dataset
from learning.evaluate import evaluate
from learning.models import build_model
from learning.params import to_numpy
from learning.replica import (
    ReplicaConfig,
    client_seed,
    fedavg,
    federation_data,
    initial_model,
    run_centralized,
    run_replica,
)
from learning.strategies import weighted_average
from workers.tasks.evaluate import evaluate_weights


def test_the_digits_replica_with_5_iid_clients_passes_85_percent_in_5_rounds() -> None:
    seen: list[int] = []
    result = run_replica(
        ReplicaConfig(clients=5, rounds=5), on_round=lambda r: seen.append(r.round)
    )
    assert seen == [1, 2, 3, 4, 5]
    assert result.accuracy[-1] > 0.85 and result.accuracy[-1] > result.accuracy[0]
    assert sum(result.rounds[0].client_samples) == 1437


def test_the_seeding_convention_is_pinned_and_distinct_per_round_and_client() -> None:
    # Devices derive the same numbers: numpy SeedSequence([seed, round, client]).
    assert client_seed(0, 1, 0) == 3964924996
    assert client_seed(0, 1, 1) == 901243215
    seeds = {client_seed(s, r, k) for s in range(3) for r in range(1, 6) for k in range(10)}
    assert len(seeds) == 150


def test_the_replica_is_deterministic() -> None:
    args = {"alpha": 0.5, "min_size": 5}
    config = ReplicaConfig(
        "synthetic", clients=3, rounds=2, partition="dirichlet", partition_args=args
    )
    assert run_replica(config).accuracy == run_replica(config).accuracy


def test_fedavg_is_the_sample_weighted_mean_of_the_client_weights() -> None:
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((3, 4)).astype(np.float32), "n": np.array(5)}
    clients = [
        ({"w": rng.standard_normal((3, 4)).astype(np.float32), "n": np.array(5 + i)}, count)
        for i, count in enumerate([10, 250, 37])
    ]
    out = fedavg(base, clients)
    reference = weighted_average([{"w": c["w"]} for c, _ in clients], [10, 250, 37])["w"]
    assert out["w"].dtype == np.float32 and np.allclose(out["w"], reference, atol=1e-6)
    assert int(out["n"]) == 7


def test_the_evaluate_task_scores_on_the_replicas_test_set() -> None:
    config = ReplicaConfig()
    data, parts = federation_data(config)
    assert sum(len(p) for p in parts) == len(data.y_train)
    model = initial_model(config, data)
    _, accuracy = evaluate(model, data.x_test, data.y_test)
    metrics = evaluate_weights(to_numpy(model), {"model": "mlp", "dataset": "digits"})
    assert metrics["accuracy"] == pytest.approx(accuracy) and metrics["num_samples"] == 360
    cnn = build_model("cnn", input_shape=(64,), channels=(4,), hidden=16, seed=0)
    _, cnn_accuracy = evaluate(cnn, data.x_test, data.y_test)
    run_config = {"model": {"name": "cnn", "channels": [4], "hidden": 16}, "dataset": "digits"}
    by_torch = evaluate_weights(to_numpy(cnn), run_config)
    assert by_torch["accuracy"] == pytest.approx(cnn_accuracy)


def test_the_centralized_baseline_trains_the_same_initial_model_on_all_data() -> None:
    config = ReplicaConfig()
    accuracy = run_centralized(config, epochs=3)
    assert len(accuracy) == 3 and accuracy[-1] > 0.9
    assert load_dataset("digits").x_train.shape == (1437, 64)
