"""SecAgg+ cost in full mode: per-round time and bytes with and without secure aggregation.

For each K: a run on the local RabbitMQ (a scratch vhost) and PostgreSQL (a scratch
database), the orchestrator service in this process, a Celery worker process, and K
devices as threads of this process, each with its own AMQP connection (K device processes
would each load torch: 100 of them do not fit this machine). Digits MLP, 1 local epoch,
FedAvg, no dropouts; the plain and the secure run of a K share the machine one after the
other. Round 1 is a warm-up; the figures are the median of the rounds after it.

- *time*: the round's ``opened_at`` to its model version's ``created_at`` (the
  announcement, training, the SecAgg+ stages, ingest, aggregation and unmasking);
- *up*: what the devices sent per round: update blobs, and the stage messages (keys,
  share boxes, reveals) as JSON with their MACs; signals and heartbeats are left out;
- *down*: what the devices received per round: the model chunks, the announcement, the
  notices and the stage messages (roster, inbox, unmask request).

    PYTHONPATH=. python benchmarks/secagg_full.py [--clients 10 50 100] [--rounds 3]
    PYTHONPATH=. python benchmarks/secagg_full.py --clients 50 --degrees 4 12 49
    PYTHONPATH=. python benchmarks/secagg_full.py --resnet18 --clients 10 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _report import publish
from _scratch import drop_scratch, make_scratch

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from devices.client import FederatedClient
from devices.config import TrainingConfig
from devices.transport import BusTransport, Inbound
from devices.wire import Identity
from fedmq.settings import Settings
from fedmq.wiring import device_config, open_bus, orchestrator_service
from learning.data import load_dataset
from learning.models import build_model
from learning.params import to_numpy
from orchestrator.runs import create_run
from orchestrator.state import Autorun, RoundPolicy
from orchestrator.store import step_run
from protocol import codec
from protocol.bus import connect
from protocol.messages import Envelope, UpdateMeta
from protocol.secagg import SecAggConfig
from simulation import fleet_local
from simulation.simulate import SimOptions, _initial_model

WHERE = (
    "Where the time goes: a secure round adds three exchanges to the plain round's one "
    "(keys, share boxes, reveals: each a message per device on the signals queue, stepped"
    " through the round machine under the run lock and saved with the snapshot, whose "
    "head carries the round's SecAgg+ state), and an inbox and two broadcasts from the "
    "outbox; the devices derive K-1 channel keys, Shamir-share two secrets to k "
    "neighbours and expand one ChaCha20 mask per neighbour; the worker rebuilds "
    "survivors' seeds and expands their masks. Up: the masked vector is 4 bytes a "
    "parameter and incompressible (uniform in Z_2^32), where the plain fp32 delta "
    "compresses under zstd; keys, boxes and reveals add O(K·k) small messages. Down: the "
    "roster lists every device's keys and goes to every device (O(K²) bytes in all; about"
    " 20 KiB at K = 100, to each device). Quantisation loses at most 0.5/scale a "
    "coordinate, so accuracy should match the plain column's. Flower's published SecAgg+ "
    "figures, and a reading of the SecAgg+ tables together: the ResNet-18 section below."
)
MAC_HEX = 64 + 10  # the MAC field a signed stage message carries on the wire


class Counting(BusTransport):
    """The AMQP transport, counting the bytes of what it sends and receives by round."""

    def __init__(self, bus: Any, tally: dict[str, int]) -> None:
        super().__init__(bus)
        self.tally = tally

    def send_stage(self, ident: Identity, msg: Envelope) -> None:
        self.tally["up"] += len(msg.to_json()) + MAC_HEX
        super().send_stage(ident, msg)

    def send_update(self, meta: UpdateMeta, blob: bytes, chunk_size: int) -> None:
        self.tally["up"] += len(blob) + len(meta.to_json())
        super().send_update(meta, blob, chunk_size)

    def receive(self, ident: Identity, timeout: float) -> Inbound | None:
        d = super().receive(ident, timeout)
        if d is not None:
            self.tally["down"] += len(d.body)
        return d


def measure(
    k: int,
    rounds: int,
    secure: bool,
    logs: Path,
    degree: int | None = None,
    hidden: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    scratch = make_scratch("bench_secagg")
    try:
        return _measure(k, rounds, secure, logs, scratch.amqp_url, scratch.db_url, degree, hidden)
    finally:
        drop_scratch(scratch)


def _initial(hidden: tuple[int, ...] | None) -> bytes:
    """Version 0: the digits MLP, or one with ``hidden`` widths (seeded like the default)."""
    if hidden is None:
        return _initial_model(SimOptions())
    data = load_dataset("digits")
    model = build_model(
        "mlp",
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        seed=0,
        hidden=hidden,
    )
    return codec.encode(to_numpy(model), codec.Encoding.FP32)


def _measure(
    k: int,
    rounds: int,
    secure: bool,
    logs: Path,
    amqp_url: str,
    db_url: str,
    degree: int | None = None,
    hidden: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    migrations.upgrade(db_url)
    model_args: dict[str, Any] = {"hidden": list(hidden)} if hidden else {}
    settings = Settings(broker_url=amqp_url, database_url=db_url, heartbeat_interval_s=2.0)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as s:
        run_id = create_run(
            s,
            f"bench-{'secure' if secure else 'plain'}-{k}",
            _initial(hidden),
            policy=RoundPolicy(
                min_clients=k, quorum_fraction=1.0, deadline_s=600, heartbeat_timeout_s=120
            ),
            train={"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
            extra_config={"model": {"name": "mlp", **model_args}, "dataset": {"name": "digits"}},
            secagg={"stage_s": 300.0, "degree": degree} if secure else None,
        )
    service = orchestrator_service(settings, open_bus(settings))
    service.start()
    worker = fleet_local.worker_process(settings, logs, name=f"worker-{k}-{int(secure)}")
    tallies: dict[str, dict[str, int]] = {}
    clients: list[FederatedClient] = []
    for i in range(k):
        tally: dict[str, int] = defaultdict(int)
        config = device_config(
            settings,
            run_id,
            i,
            k,
            training=TrainingConfig(
                encoding="fp32", torch_threads=None, model="mlp", model_args=model_args
            ),
            poll_s=0.2,
        )
        clients.append(FederatedClient(config, Counting(connect(amqp_url), tally)))
        tallies[config.name] = tally
    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda c: c.start(timeout=300), clients))
        _wait(lambda: _ready(sessions, run_id) == k, 300, f"{k} ready devices")
        with session_scope(sessions) as s:
            step_run(s, run_id, Autorun(rounds), time.time())
        # Bytes between the warm-up round's version and the last one's, per round: a
        # round's traffic ends with its version (its successor opens after evaluation).
        per_round: list[dict[str, float]] = []
        marks: list[dict[str, int]] = []
        for number in range(1, rounds + 1):
            _wait(lambda n=number: _versioned(sessions, run_id, n), 900, f"round {number}")
            marks.append(_snapshot(tallies))
            with session_scope(sessions) as s:
                rnd = q.get_round(s, run_id, number)
                assert rnd is not None and rnd.model_version_id is not None
                mv = q.get_model_version_by_id(s, rnd.model_version_id)
                assert mv is not None
                seconds = (mv.created_at - rnd.opened_at).total_seconds()
                updates = len(q.received_updates(s, rnd.id))
            assert updates == k, (number, updates)
            per_round.append({"seconds": seconds})
        _wait(lambda: _done(sessions, run_id, rounds), 300, "the last evaluation")
        with session_scope(sessions) as s:
            accuracy = float((q.list_rounds(s, run_id)[-1].metrics or {}).get("accuracy", 0))
    finally:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda c: c.stop(leave=True, timeout=30), clients))
        service.stop()
        worker.join(timeout=30)
        engine.dispose()
    measured = per_round[1:] or per_round
    span = max(1, len(marks) - 1)
    return {
        "seconds": statistics.median(r["seconds"] for r in measured),
        "bytes_up": (marks[-1]["up"] - marks[0]["up"]) / span,
        "bytes_down": (marks[-1]["down"] - marks[0]["down"]) / span,
        "accuracy": accuracy,
        "rounds": per_round,
    }


def _snapshot(tallies: dict[str, dict[str, int]]) -> dict[str, int]:
    return {
        "up": sum(t["up"] for t in tallies.values()),
        "down": sum(t["down"] for t in tallies.values()),
    }


def _ready(sessions: Any, run_id: str) -> int:
    with session_scope(sessions) as s:
        return sum(c.state == "ready" for c in q.list_clients(s, run_id))


def _versioned(sessions: Any, run_id: str, number: int) -> bool:
    with session_scope(sessions) as s:
        rnd = q.get_round(s, run_id, number)
        return rnd is not None and rnd.model_version_id is not None


def _done(sessions: Any, run_id: str, rounds: int) -> bool:
    with session_scope(sessions) as s:
        return sum(str(r.state) == "done" for r in q.list_rounds(s, run_id)) == rounds


def _wait(check: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--logs", type=Path, default=Path("/tmp/fedmq-bench-secagg"))
    ap.add_argument(
        "--degrees",
        type=int,
        nargs="+",
        help="Instead: the graph degree's effect at the first --clients (None: the default)",
    )
    ap.add_argument(
        "--resnet18",
        action="store_true",
        help="Instead: a ResNet-18-size vector at the first --clients, and where time goes",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # K devices share this machine's cores
    if args.resnet18:
        from secagg_resnet import resnet_table

        resnet_table(args.clients[0], args.rounds, args.logs, measure)
        return
    if args.degrees:
        degree_table(args.clients[0], args.degrees, args.rounds, args.logs)
        return
    started = time.perf_counter()
    load_before = os.getloadavg()
    rows = []
    for k in args.clients:
        plain = measure(k, args.rounds, False, args.logs)
        secure = measure(k, args.rounds, True, args.logs)
        rows.append({"clients": k, "plain": plain, "secagg": secure})
        print(k, plain["seconds"], secure["seconds"], flush=True)
    load_after = os.getloadavg()
    lines = [
        "| K | time plain (s) | time SecAgg+ (s) | ratio | up plain (KiB) | up SecAgg+ (KiB) "
        "| down plain (KiB) | down SecAgg+ (KiB) | accuracy plain / SecAgg+ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, s = r["plain"], r["secagg"]
        lines.append(
            f"| {r['clients']} | {p['seconds']:.2f} | {s['seconds']:.2f} | "
            f"{s['seconds'] / p['seconds']:.2f}x | "
            f"{p['bytes_up'] / 1024:.0f} | {s['bytes_up'] / 1024:.0f} | "
            f"{p['bytes_down'] / 1024:.0f} | {s['bytes_down'] / 1024:.0f} | "
            f"{p['accuracy']:.3f} / {s['accuracy']:.3f} |"
        )
    lines += [
        "",
        f"Full mode: RabbitMQ and PostgreSQL on this machine, the orchestrator in the "
        f"benchmark's process, one Celery worker process, K devices as threads with an AMQP "
        f"connection each (torch on one thread). Digits MLP, 1 epoch, FedAvg, no dropouts, "
        f"{args.rounds} rounds of which the first is a warm-up; median of the others. Time: "
        f"round opened to model version stored. Up/down: per round (the others' mean), all "
        f"devices together, "
        f"as counted at the devices' transport (update blobs, stage messages with MACs, "
        f"model chunks, announcements, notices; no signals or heartbeats). Load average "
        f"before {load_before[0]:.1f}, after {load_after[0]:.1f} (2 cores, shared).",
    ]
    lines += ["", WHERE]
    text = "\n".join(lines)
    print(text)
    publish(
        "secagg_full",
        "## SecAgg+ in full mode: cost per round (digits MLP, RabbitMQ + Postgres)\n\n" + text,
        {
            "rounds": args.rounds,
            "rows": rows,
            "load_before": load_before,
            "load_after": load_after,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )


def degree_table(k: int, degrees: list[int], rounds: int, logs: Path) -> None:
    """Secure runs of K devices at each graph degree (K - 1: all pairs, plain SecAgg)."""
    started = time.perf_counter()
    load_before = os.getloadavg()
    rows = []
    for d in degrees:
        got = measure(k, rounds, True, logs, degree=d)
        rows.append({"degree": d, **got})
        print(d, got["seconds"], flush=True)
    load_after = os.getloadavg()
    lines = [
        f"| degree k (K = {k}) | threshold t | time (s) | up (KiB) | down (KiB) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cfg = SecAggConfig(degree=r["degree"])
        lines.append(
            f"| {cfg.degree_for(k)} | {cfg.threshold_for(k)} | {r['seconds']:.2f} | "
            f"{r['bytes_up'] / 1024:.0f} | {r['bytes_down'] / 1024:.0f} |"
        )
    lines += [
        "",
        f"The same setting as the table above, secure runs only, {rounds} rounds (the "
        f"first a warm-up). A degree of K - 1 is the original all-pairs SecAgg: every "
        f"device shares with and masks against every other; SecAgg+'s O(log K) graph "
        f"needs K·k share boxes and masks instead of K·(K - 1). Load average before "
        f"{load_before[0]:.1f}, after {load_after[0]:.1f} (2 cores, shared).",
    ]
    text = "\n".join(lines)
    print(text)
    publish(
        "secagg_degree",
        f"## SecAgg+ in full mode: the graph degree's effect (K = {k})\n\n" + text,
        {"clients": k, "rounds": rounds, "rows": rows,
         "load_before": load_before, "load_after": load_after,
         "seconds": round(time.perf_counter() - started, 1)},
    )  # fmt: skip


if __name__ == "__main__":
    main()
