"""Flower client code as a Flower user writes it (Flower's PyTorch quickstart, task.py and
client_app.py in one file), on the digits partitions that fedmq's own devices hold.

Nothing here knows fedmq: the tests run these objects with ``fedmq device --flower-client
tests.flower_quickstart:numpy_app`` (or ``:message_app``) and through the SDK. The data
comes from fedmq's dataset loader only because that is where the digits partitions are.

- ``numpy_app``: ``ClientApp(client_fn=...)`` around a ``NumPyClient`` (the classic
  quickstart: ``get_parameters``, ``fit``, ``evaluate``); its ``Net`` names its layers
  ``fc1``/``fc2``, so its parameters travel as a list in state-dict order.
- ``message_app``: the Message API quickstart, ``@app.train()`` and ``@app.evaluate()``
  receiving an ``ArrayRecord`` and a ``ConfigRecord``; its model has the state dict of the
  ServerApp's model (here the run's ``mlp``), as Flower's ServerApp and ClientApp share one.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learning.data import load_dataset, partition

# --- task.py ------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class SequentialNet(nn.Module):
    """The same network with the run model's layer names (``net.0``, ``net.2``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_data(node_config: dict[str, Any], batch_size: int = 32) -> tuple[Any, Any]:
    """This node's partition of the training set, and the held-out test set."""
    data = load_dataset("digits")
    num_partitions = int(node_config["num-partitions"])
    seed = int(node_config.get("partition-seed", 0))
    idx = partition("iid", data.y_train, num_partitions, seed=seed)[
        int(node_config["partition-id"])
    ]
    train = TensorDataset(
        torch.as_tensor(data.x_train[idx], dtype=torch.float32),
        torch.as_tensor(data.y_train[idx], dtype=torch.int64),
    )
    test = TensorDataset(
        torch.as_tensor(data.x_test, dtype=torch.float32),
        torch.as_tensor(data.y_test, dtype=torch.int64),
    )
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(test, batch_size=256)


def train(net: nn.Module, loader: Any, epochs: int, lr: float, momentum: float) -> float:
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    net.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
    return total / max(count, 1)


def test(net: nn.Module, loader: Any) -> tuple[float, float]:
    criterion = nn.CrossEntropyLoss(reduction="sum")
    net.eval()
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            out = net(x)
            loss += float(criterion(out, y))
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
    return loss / n, correct / n


def get_weights(net: nn.Module) -> list[np.ndarray]:
    return [val.cpu().numpy() for _, val in net.state_dict().items()]


def set_weights(net: nn.Module, parameters: list[np.ndarray]) -> None:
    params_dict = zip(net.state_dict().keys(), parameters, strict=True)
    state_dict = OrderedDict({k: torch.tensor(v) for k, v in params_dict})
    net.load_state_dict(state_dict, strict=True)


# --- client_app.py: a NumPyClient -----------------------------------------------------------


class FlowerClient(NumPyClient):
    def __init__(self, net: nn.Module, trainloader: Any, valloader: Any, local_epochs: int):
        self.net, self.trainloader, self.valloader = net, trainloader, valloader
        self.local_epochs = local_epochs

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return get_weights(self.net)

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        set_weights(self.net, parameters)
        train_loss = train(
            self.net,
            self.trainloader,
            int(config.get("local-epochs", self.local_epochs)),
            float(config["lr"]),
            float(config.get("momentum", 0.9)),
        )
        metrics = {"train_loss": train_loss, "round_seen": config["server-round"]}
        return get_weights(self.net), len(self.trainloader.dataset), metrics

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        set_weights(self.net, parameters)
        loss, accuracy = test(self.net, self.valloader)
        return loss, len(self.valloader.dataset), {"accuracy": accuracy}


def client_fn(context: Context) -> Any:
    trainloader, valloader = load_data(context.node_config)
    local_epochs = int(context.run_config["local-epochs"])
    return FlowerClient(Net(), trainloader, valloader, local_epochs).to_client()


numpy_app = ClientApp(client_fn=client_fn)


# --- client_app.py: the Message API ---------------------------------------------------------

message_app = ClientApp()


@message_app.train()
def train_fn(msg: Message, context: Context) -> Message:
    model = SequentialNet()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainloader, _ = load_data(context.node_config)
    config = msg.content["config"]
    train_loss = train(
        model,
        trainloader,
        int(context.run_config["local-epochs"]),
        float(config["lr"]),
        float(config["momentum"]),
    )
    # Bookkeeping across rounds in the node's state, as Flower keeps it.
    seen = context.state.get("rounds", MetricRecord({"count": 0}))
    seen["count"] = int(seen["count"]) + 1
    context.state["rounds"] = seen
    metrics = {
        "train_loss": train_loss,
        "num-examples": len(trainloader.dataset),
        "rounds_trained": seen["count"],
        "server_round": int(config["server-round"]),
    }
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


@message_app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    model = SequentialNet()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, valloader = load_data(context.node_config)
    loss, accuracy = test(model, valloader)
    metrics = {"loss": loss, "accuracy": accuracy, "num-examples": len(valloader.dataset)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
