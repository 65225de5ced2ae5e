"""One process of the shaped split benchmark (``split_shaped.py``): a device or the edge.

Run as ``python benchmarks/_split_node.py CORE`` (pinned to CORE by the parent before
exec); it reads jobs, one JSON line each, from stdin. Per job it sets up at full speed
(model, warm-up, bus connection), prints ``ready``, is moved into its compute budget (a
device, by the parent), waits for ``go``, then trains (a device) or serves the session
(the edge), writes its model state to ``job["out"]`` (an .npz) and prints its figures as
one ``result`` JSON line. Devices run inside their network namespace.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from split_scenarios import SCENARIOS, Setup, _model, _shards, _spec, _train_args

from devices.split import BusEdge
from learning.params import to_numpy
from learning.split import LocalEdge, SplitTimings, sgd, split_model, train_split
from protocol.bus import connect
from protocol.topology import exchanges
from workers.edge.session import EdgeSession, EdgeSessionConfig
from workers.edge.task import body_state, build_engine


def _wait_go() -> None:
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("no go")


def device(job: dict[str, Any]) -> dict[str, Any]:
    setup = Setup(**job["setup"])
    sc = SCENARIOS[job["scenario"] - 1]
    i = job["index"]
    x, y = _shards(setup)[0][i]
    split = split_model(_model(setup))
    loss = "fused" if sc.fused_softmax else "unfused"
    timings = SplitTimings()
    args = _train_args(setup, i)
    edge: Any
    if sc.split:
        bus = connect(job["broker"])
        edge = BusEdge(bus, job["session_id"], f"d{i}", encoding=setup.encoding, timeout_s=120)
    else:
        edge = LocalEdge(
            split.body, sgd(split.body.parameters(), lr=setup.lr, momentum=setup.momentum)
        )
    # Warm-up at full speed, on a copy: one local step (autograd, kernels, optimizer),
    # so that the budget throttles training, not the first-call costs of a process.
    spare = split_model(_model(setup))
    warm = LocalEdge(spare.body, sgd(spare.body.parameters(), lr=setup.lr))
    train_split(spare, warm, x[: setup.batch_size], y[: setup.batch_size], loss=loss,
                **{**args, "epochs": 1})  # fmt: skip
    if sc.split:  # open this thread's connection now (declares are idempotent)
        bus.declare(exchanges())
    _wait_go()  # the parent moves this process into its compute budget first
    cpu0, t0 = time.process_time(), time.monotonic()
    # No head pipelining (``pipeline=True``) in 3 and 6: it steps the head one batch late,
    # which cost 10-29 accuracy points in-process (3 seeds); the paper's async copies
    # change no weights.
    train_split(split, edge, x, y, loss=loss, timings=timings, **args)
    t1 = time.monotonic()
    out: dict[str, Any] = {
        "start": t0,
        "end": t1,
        "cpu_s": time.process_time() - cpu0,
        "timings": asdict(timings),
    }
    if sc.split:
        edge.close()
        s = edge.stats
        out["link"] = asdict(s)
        bus.close()
    np.savez(job["out"], **to_numpy(split.model))
    return out


def edge(job: dict[str, Any]) -> dict[str, Any]:
    setup = Setup(**job["setup"])
    sc = SCENARIOS[job["scenario"] - 1]
    spec = _spec(sc, setup, job["session_id"])
    engine, names = build_engine(spec, "cpu")
    bus = connect(job["broker"])
    session = EdgeSession(
        bus,
        engine,
        EdgeSessionConfig(
            job["session_id"],
            wait_bound_s=setup.wait_bound_s,
            expected_devices=setup.devices,
            request_timeout_s=120,
        ),
    )
    result: dict[str, Any] = {}
    ready = threading.Event()
    server = threading.Thread(target=lambda: result.update(session.serve(ready)), daemon=True)
    server.start()
    ready.wait(60)
    _wait_go()
    cpu0 = time.process_time()
    # The session ends when every device has left (or, if one failed, when idle: the
    # parent then ends this process).
    server.join()
    result["cpu_s"] = time.process_time() - cpu0
    bus.close()
    np.savez(job["out"], **body_state(engine, names))
    return result


def main() -> None:
    core = int(sys.argv[1])
    # The parent pinned this process before exec (every thread inherits it); this checks.
    if os.sched_getaffinity(0) != {core}:
        raise SystemExit(f"not pinned to core {core}: {os.sched_getaffinity(0)}")
    torch.set_num_threads(1)
    print("up", flush=True)
    # One job per line, for as long as the parent keeps this process (a link's lifetime):
    # the imports and the bus connection are paid once, not per run.
    for line in sys.stdin:
        job = json.loads(line)
        torch.manual_seed(job["setup"]["seed"])
        result = device(job) if job["role"] == "device" else edge(job)
        print("result " + json.dumps(result, default=float), flush=True)


if __name__ == "__main__":
    main()
