"""Shared by the split-training tests: an edge session in a thread, devices, references."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from devices.split import BusEdge
from learning.models import build_model
from learning.split import split_model, train_split
from learning.train import train_local
from protocol.bus import Bus
from workers.edge.engine import EdgeEngine
from workers.edge.session import Authenticate, EdgeSession, EdgeSessionConfig
from workers.edge.task import build_engine

MODEL = {
    "name": "mlp",
    "num_classes": 10,
    "input_shape": [64],
    "seed": 5,
    "config": {"hidden": [32, 24, 16]},
}
TRAIN = {"epochs": 2, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "seed": 11}


def model(spec: dict[str, Any] = MODEL) -> torch.nn.Module:
    return build_model(
        spec["name"],
        num_classes=spec["num_classes"],
        input_shape=spec["input_shape"],
        seed=spec["seed"],
        **spec["config"],
    )


def data(n: int = 64, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 64)).astype(np.float32), rng.integers(0, 10, n)


def spec(session_id: str, **edge: Any) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "model": MODEL,
        "train": {"lr": TRAIN["lr"], "momentum": TRAIN["momentum"]},
        "edge": {"idle_timeout_s": 20, "request_timeout_s": 10, **edge},
    }


@contextmanager
def edge_in_thread(
    bus: Bus, session_spec: dict[str, Any], authenticate: Authenticate | None = None
) -> Iterator[tuple[EdgeEngine, dict[str, str], dict[str, Any]]]:
    """Serve ``session_spec`` on a thread; yields (engine, body names, result when done)."""
    engine, names = build_engine(session_spec, "cpu")
    edge = {k: v for k, v in session_spec["edge"].items() if k not in ("overlap", "autocast")}
    session = EdgeSession(
        bus,
        engine,
        EdgeSessionConfig(session_id=session_spec["session_id"], **edge),
        authenticate=authenticate,
    )
    result: dict[str, Any] = {}
    ready = threading.Event()
    thread = threading.Thread(target=lambda: result.update(session.serve(ready)), daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield engine, names, result
    finally:
        session.stop()
        thread.join(30)
        assert not thread.is_alive()


def train_device(
    bus: Bus, session_id: str, client: str, x: np.ndarray, y: np.ndarray, **link: Any
) -> dict[str, np.ndarray]:
    """One device's split training over the bus; its head and tail weights."""
    split = split_model(model())
    with BusEdge(bus, session_id, client, **link) as edge:
        train_split(split, edge, x, y, **TRAIN)
    names = split.state_names("head", "tail")
    return {k: v.detach().numpy().copy() for k, v in split.model.state_dict().items() if k in names}


def reference(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    ref = model()
    train_local(ref, x, y, **TRAIN)
    return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


def max_relative_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    assert set(got) == set(want)
    worst = 0.0
    for k, w in want.items():
        scale = float(np.abs(w).max()) or 1.0
        worst = max(worst, float(np.abs(got[k] - w).max()) / scale)
    return worst
