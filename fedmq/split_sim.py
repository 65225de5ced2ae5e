"""``fedmq simulate --split``: a SplitFed federation of K devices around one edge session.

Each round every device starts from the global head and tail, trains them with
``learning.split.train_split`` while the edge session (``workers.edge``) trains the shared
body over the bus (in-process, or RabbitMQ with ``--broker``), and reports its head and
tail; the round's new global head and tail are their sample-weighted mean, computed by
the aggregation path's own ``WeightedMean`` (SplitFed, Thapa et al., AAAI 2022: device
parts averaged, the server part shared). The composed model (global head and tail + the
edge's body) is evaluated on the test set after every round.

Departure: this runs beside the orchestrator, not through it. The edge session is served
in this process (a thread, one session per round) with a body that lives across rounds;
the orchestrator's rounds, the aggregate task and model versions are not involved yet
(storing the body as a model version and averaging device parts in the aggregate task
are not built).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from devices.split import BusEdge
from learning.data import load_dataset, partition
from learning.evaluate import evaluate
from learning.models import build_model
from learning.params import load_numpy, to_numpy
from learning.split import split_model, train_split
from learning.strategies import WeightedMean
from protocol.bus import connect
from workers.edge.session import EdgeSession, EdgeSessionConfig
from workers.edge.task import body_state, build_engine

# An MLP needs two hidden layers to be cut; the default simulate MLP has one.
SPLIT_MODEL_CONFIG: dict[str, dict[str, Any]] = {"mlp": {"hidden": [128, 64]}}


@dataclass(frozen=True)
class SplitSimOptions:
    dataset: str = "digits"
    model: str = "mlp"
    partition: str = "iid"
    partition_args: dict[str, Any] | None = None
    clients: int = 3
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    encoding: str = "bf16"
    seed: int = 0
    out: Path = Path("fedmq-out")
    broker: str | None = None
    edge_device: str = "auto"


@dataclass(frozen=True)
class SplitRound:
    round: int
    accuracy: float
    loss: float
    seconds: float
    bytes_sent: int


def run_split(options: SplitSimOptions, log: Any = print) -> list[SplitRound]:
    o = options
    data = load_dataset(o.dataset, seed=o.seed)
    shards = partition(o.partition, data.y_train, o.clients, o.seed, **(o.partition_args or {}))
    model_spec = {
        "name": o.model,
        "num_classes": data.num_classes,
        "input_shape": list(data.input_shape),
        "seed": o.seed,
        "config": SPLIT_MODEL_CONFIG.get(o.model, {}),
    }

    def fresh() -> Any:
        return build_model(
            o.model,
            num_classes=data.num_classes,
            input_shape=data.input_shape,
            seed=o.seed,
            **model_spec["config"],
        )

    reference = split_model(fresh())
    device_names = set(reference.state_names("head", "tail"))
    global_parts = {k: v for k, v in to_numpy(reference.model).items() if k in device_names}
    spec = {"session_id": "sim", "model": model_spec, "train": {"lr": o.lr, "momentum": o.momentum}}
    engine, names = build_engine(spec, o.edge_device)
    bus = connect(o.broker or f"memory://split-sim-{uuid.uuid4().hex[:8]}")
    rows: list[SplitRound] = []
    try:
        for r in range(1, o.rounds + 1):
            began = time.perf_counter()
            session_id = f"sim{uuid.uuid4().hex[:8]}r{r}"
            session = EdgeSession(
                bus, engine, EdgeSessionConfig(session_id, expected_devices=o.clients)
            )
            ready = threading.Event()
            server = threading.Thread(target=session.serve, args=(ready,), daemon=True)
            server.start()
            ready.wait(30)
            results: list[tuple[dict[str, np.ndarray], int, int] | None] = [None] * o.clients
            errors: list[BaseException] = []
            threads = [
                threading.Thread(
                    target=_device,
                    args=(o, bus, session_id, r, k, fresh, global_parts, data, shards[k]),
                    kwargs={"results": results, "errors": errors, "names": device_names},
                )
                for k in range(o.clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            session.stop()
            server.join(60)
            if errors:
                raise RuntimeError(f"round {r}: a device failed: {errors[0]!r}") from errors[0]
            done = [x for x in results if x is not None]
            mean = WeightedMean()
            for parts, n, _ in done:
                mean.add(parts, n)
            global_parts = {k: v.astype(np.float32) for k, v in mean.result().items()}
            model = fresh()
            load_numpy(model, {**to_numpy(model), **global_parts, **body_state(engine, names)})
            loss, acc = evaluate(model, data.x_test, data.y_test)
            rows.append(
                SplitRound(r, acc, loss, time.perf_counter() - began, sum(b for *_, b in done))
            )
            log(f"round {r}: accuracy {100 * acc:.2f}%, loss {loss:.4f}, {rows[-1].seconds:.1f} s")
    finally:
        bus.close()
    o.out.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(o).items()}
    (o.out / "split_metrics.json").write_text(
        json.dumps({"config": config, "rounds": [asdict(x) for x in rows]}, indent=2) + "\n"
    )
    return rows


def _device(
    o: SplitSimOptions,
    bus: Any,
    session_id: str,
    r: int,
    k: int,
    fresh: Any,
    global_parts: dict[str, np.ndarray],
    data: Any,
    idx: np.ndarray,
    *,
    results: list[Any],
    errors: list[BaseException],
    names: set[str],
) -> None:
    """Device ``k``'s round: global head and tail in, split training, its parts out."""
    try:
        split = split_model(fresh())
        load_numpy(split.model, {**to_numpy(split.model), **global_parts})
        with BusEdge(bus, session_id, f"c{k}", encoding=o.encoding) as link:
            train_split(
                split,
                link,
                data.x_train[idx],
                data.y_train[idx],
                epochs=o.local_epochs,
                batch_size=o.batch_size,
                lr=o.lr,
                momentum=o.momentum,
                seed=o.seed * 100_003 + r * 1009 + k,
            )
        parts = {n: v for n, v in to_numpy(split.model).items() if n in names}
        results[k] = (parts, len(idx), link.stats.bytes_sent)
    except BaseException as e:
        errors.append(e)
