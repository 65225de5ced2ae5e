"""``FlowerTrainer``: real Flower clients (flwr's own ClientApp, NumPyClient and records)
driven as a device's trainer, without a federation: what reaches ``fit``, what comes back,
and what is refused."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

if os.environ.get("CI", "").lower() not in {"1", "true", "yes"}:
    pytest.importorskip("flwr", reason="needs the flower extra: pip install 'fedmq[flower]'")

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

from devices.config import DeviceConfig, TrainingConfig, TrainSettings
from devices.flower import FlowerError, FlowerTrainer, load_client_app
from learning.params import to_numpy
from protocol.codec import decode

K = 3


def _config(k: int = 1, **training: Any) -> DeviceConfig:
    return DeviceConfig(
        run_id="run-1",
        client_index=k,
        num_clients=K,
        training=TrainingConfig(encoding="fp32", **training),
    )


class Recording(NumPyClient):
    """Adds ``step`` to every array; remembers what it was called with."""

    def __init__(self, step: float = 1.0, shapes: list[tuple[int, ...]] | None = None) -> None:
        self.step, self.shapes = step, shapes
        self.fit_configs: list[dict[str, Any]] = []
        self.received: list[list[np.ndarray]] = []

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        self.fit_configs.append(dict(config))
        self.received.append(parameters)
        out = [p + self.step for p in parameters]
        if self.shapes is not None:
            out = [np.zeros(s, np.float32) for s in self.shapes]
        return out, 40, {"train_loss": 0.25, "train_accuracy": 0.5, "note": "text"}


def _settings(**train_config: Any) -> TrainSettings:
    return TrainSettings().with_overrides(train_config)


def test_fit_gets_the_global_model_in_state_dict_order_and_flowers_config() -> None:
    client = Recording()
    trainer = FlowerTrainer.from_app(client, _config())
    weights = to_numpy(trainer.model)
    settings = _settings(epochs=2, lr=0.01, proximal_mu=0.1, schedule="cosine", skip=None)
    update = trainer.step(weights, model_version=4, round_number=3, settings=settings)

    assert [p.shape for p in client.received[0]] == [w.shape for w in weights.values()]
    for got, want in zip(client.received[0], weights.values(), strict=True):
        np.testing.assert_array_equal(got, want)
    config = client.fit_configs[0]
    assert config["server-round"] == 3
    assert config["local-epochs"] == 2 and config["epochs"] == 2
    assert config["lr"] == 0.01 and config["proximal_mu"] == 0.1 and config["proximal-mu"] == 0.1
    assert config["schedule"] == "cosine" and "skip" not in config  # None has no ConfigRecord
    assert config["momentum"] == 0.9 and config["batch-size"] == 32
    assert trainer.context.run_config["local-epochs"] == 2
    assert "server-round" not in trainer.context.run_config

    # The update is the delta of what fit returned against the round's global model.
    blob = decode(update.blob)
    assert blob.delta and blob.base_version == "4" and update.num_samples == 40
    for name in weights:
        np.testing.assert_allclose(blob.tensors[name], np.ones_like(weights[name]))
    assert update.metrics["loss"] == 0.25 and update.metrics["train_loss"] == 0.25
    assert update.metrics["accuracy"] == 0.5 and "note" not in update.metrics
    assert update.metrics["train_time_s"] >= 0


def test_a_client_fn_gets_this_devices_partition_in_its_node_config() -> None:
    seen: list[Context] = []

    def client_fn(context: Context) -> Any:
        seen.append(context)
        return Recording().to_client()

    trainer = FlowerTrainer.from_app(ClientApp(client_fn=client_fn), _config(k=2, seed=7))
    trainer.step(to_numpy(trainer.model), 0, 1, _settings())
    trainer.step(to_numpy(trainer.model), 1, 2, _settings())
    node = dict(seen[0].node_config)
    assert node == {"partition-id": 2, "num-partitions": K, "partition-seed": 7}
    assert seen[0] is seen[-1]  # one context, kept across rounds as a SuperNode keeps it


@pytest.mark.parametrize(
    ("shapes", "message"),
    [([(128, 64)], "returned 1 arrays"), ([(64, 128), (128,), (10, 128), (10,)], "shape")],
)
def test_arrays_that_do_not_fit_the_runs_model_are_refused(
    shapes: list[tuple[int, ...]], message: str
) -> None:
    trainer = FlowerTrainer.from_app(Recording(shapes=shapes), _config())
    with pytest.raises(FlowerError, match=message):
        trainer.step(to_numpy(trainer.model), 0, 1, _settings())


def _message_app(*, evaluate: bool, examples: bool = True) -> tuple[ClientApp, list[Any]]:
    app, seen = ClientApp(), []

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        seen.append((list(arrays.keys()), dict(msg.content["config"])))
        state = arrays.to_torch_state_dict()
        doubled = {k: v * 2 for k, v in state.items()}
        metrics: dict[str, Any] = {"train_loss": 1.5}
        if examples:
            metrics["num-examples"] = 12
        content = RecordDict({"arrays": ArrayRecord(doubled), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    if evaluate:

        @app.evaluate()
        def evaluate_fn(msg: Message, context: Context) -> Message:
            record = MetricRecord({"accuracy": 0.75, "num-examples": 9})
            return Message(content=RecordDict({"metrics": record}), reply_to=msg)

    return app, seen


def test_a_message_api_app_gets_an_array_record_of_the_runs_names() -> None:
    app, seen = _message_app(evaluate=True)
    trainer = FlowerTrainer.from_app(app, _config())
    weights = to_numpy(trainer.model)
    update = trainer.step(weights, 0, 5, _settings(lr=0.2))
    names, config = seen[0]
    assert names == list(weights)
    assert config["server-round"] == 5 and config["lr"] == 0.2
    delta = decode(update.blob).tensors
    for name, w in weights.items():
        np.testing.assert_allclose(delta[name], w, rtol=1e-6, atol=1e-7)  # 2w - w
    assert update.num_samples == 12
    assert update.metrics["eval_accuracy"] == 0.75 and update.metrics["loss"] == 1.5


def test_a_message_api_reply_without_num_examples_is_refused() -> None:
    app, _ = _message_app(evaluate=False, examples=False)
    trainer = FlowerTrainer.from_app(app, _config())
    with pytest.raises(FlowerError, match="num-examples"):
        trainer.step(to_numpy(trainer.model), 0, 1, _settings())


def test_evaluate_reports_on_the_global_model_and_is_skipped_where_missing() -> None:
    class Evaluating(Recording):
        def evaluate(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[float, int, dict[str, Any]]:
            return 0.5, 30, {"accuracy": 0.9}

    trainer = FlowerTrainer.from_app(Evaluating(), _config())
    metrics = trainer.step(to_numpy(trainer.model), 0, 1, _settings()).metrics
    assert metrics["eval_loss"] == 0.5 and metrics["eval_accuracy"] == 0.9
    assert metrics["eval_num_examples"] == 30
    plain = FlowerTrainer.from_app(Recording(), _config())
    assert "eval_loss" not in plain.step(to_numpy(plain.model), 0, 1, _settings()).metrics
    assert not plain.evaluate


def test_a_failing_client_fails_its_round_with_its_own_error() -> None:
    """(The device's training slot reports it as the round's error; the device goes on.)"""

    class Broken(NumPyClient):
        def fit(self, parameters: Any, config: Any) -> Any:
            raise RuntimeError("out of memory")

    trainer = FlowerTrainer.from_app(Broken(), _config())
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.step(to_numpy(trainer.model), 0, 1, _settings())


def test_load_client_app_by_name() -> None:
    app = load_client_app("tests.flower_quickstart:numpy_app")
    assert isinstance(app, ClientApp)
    assert isinstance(load_client_app("tests.flower_quickstart:client_fn"), ClientApp)
    for bad, why in [
        ("tests.flower_quickstart", "package.module:object"),
        ("tests.no_such_module:app", "cannot import"),
        ("tests.flower_quickstart:nothing", "has no nothing"),
        ("tests.flower_quickstart:K_NOT_THERE", "has no"),
    ]:
        with pytest.raises(FlowerError, match=why):
            load_client_app(bad)
    with pytest.raises(FlowerError, match="expected a ClientApp"):
        load_client_app(42)


def test_a_device_config_with_a_flower_client_builds_a_flower_trainer() -> None:
    from devices.client import FederatedClient
    from protocol.bus import connect

    config = _config(flower_client="tests.flower_quickstart:message_app")
    bus = connect("memory://flower-unit")
    try:
        client = FederatedClient(config, bus)
        assert isinstance(client.trainer, FlowerTrainer) and not client.trainer.legacy
    finally:
        bus.close()
    with pytest.raises(ValueError, match="runtime must be torch"):
        _config(flower_client="tests.flower_quickstart:numpy_app", runtime="wasm")
