"""Does the platform change the math? fedmq federations against a plain FedAvg replica.

Digits, MLP 64→128→10, SGD lr 0.05 momentum 0.9, batch 32, 1 local epoch, 20 rounds,
FedAvg, stratified 80/20 split (seed 0), test set held by the server; K ∈ {2, 5, 10}
clients, IID and Dirichlet(0.5). Each configuration runs as a real fedmq federation
(``simulation.simulate``: orchestrator, Celery tasks and devices over the bus) with fp32, bf16
and int8 transport, and as ``learning.replica`` (one process, same seeds, split and
partitions). Embedded mode (in-process bus, SQLite, eager tasks) by default; ``--full`` runs
full mode (RabbitMQ, Postgres, a worker and device processes: ``federation_full.py``) and
measures where each round's time goes.

Usage: ``python benchmarks/federation.py [--quick] [--full]`` (--quick: K=2 IID, 5 rounds,
no files).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, publish

from fedmq.settings import Settings
from learning.replica import ReplicaConfig, run_centralized, run_replica
from simulation.report import RoundRow
from simulation.simulate import SimOptions, run

ENCODINGS = ("fp32", "bf16", "int8")
PLOT = ROOT / "docs" / "img" / "federation_vs_replica.png"


@dataclass
class Outcome:
    clients: int
    partition: str
    replica: list[float]
    runs: dict[str, list[RoundRow]]
    wall_s: dict[str, float]


def _federate(
    k: int, partition: str, alpha: dict[str, float], rounds: int, enc: str, out: Path
) -> tuple[list[RoundRow], float]:
    options = SimOptions(
        clients=k, rounds=rounds, partition=partition, partition_args=alpha, encoding=enc, out=out
    )
    quiet = Console(file=io.StringIO(), width=120)
    result = run(options, Settings(_env_file=None), quiet)
    return result.rows, result.seconds


def measure(k: int, partition: str, rounds: int, tmp: Path) -> Outcome:
    alpha = {"alpha": 0.5} if partition == "dirichlet" else {}
    replica = run_replica(
        ReplicaConfig(clients=k, rounds=rounds, partition=partition, partition_args=alpha)
    ).accuracy
    runs, wall = {}, {}
    for enc in ENCODINGS:
        runs[enc], wall[enc] = _federate(
            k, partition, alpha, rounds, enc, tmp / f"{k}-{partition}-{enc}"
        )
    return Outcome(k, partition, replica, runs, wall)


def _acc(rows: list[RoundRow]) -> list[float]:
    return [r.accuracy or 0.0 for r in rows]


def _pts(x: float) -> str:
    return f"{100 * x:.2f}"


def int8_bound() -> dict[str, float]:
    """Why int8 cannot reach half of bf16's bytes on this model: bits per parameter of one
    real round-1 delta (client 0 of 5) as sent in bf16 and int8, and the zeroth-order
    entropy of its per-channel int8 values (what any lossless coder of them needs)."""
    import numpy as np

    from devices.config import DeviceConfig, TrainSettings
    from devices.local import LocalTrainer
    from learning.data import load_dataset
    from learning.models import build_model
    from learning.params import to_numpy
    from protocol.codec import Encoding, encode

    trainer = LocalTrainer.from_config(DeviceConfig(run_id="r", client_index=0, num_clients=5))
    data = load_dataset("digits")
    start = to_numpy(build_model("mlp", num_classes=10, input_shape=data.input_shape, seed=0))
    trained, _ = trainer.train(start, 1, TrainSettings())
    d = {k: trained[k] - start[k] for k in start}
    n = sum(v.size for v in d.values())
    zeros = {k: np.zeros_like(v) for k, v in d.items()}
    bits = {
        enc: 8 * len(encode(d, Encoding(enc), base=zeros, base_version="0")) / n
        for enc in ("bf16", "int8")
    }
    entropy = 0.0
    for v in d.values():
        rows = v.reshape(v.shape[0], -1) if v.ndim > 1 else v.reshape(1, -1)
        scale = np.abs(rows).max(axis=1, keepdims=True) / 127
        q = np.round(rows / np.where(scale == 0, 1, scale))
        _, counts = np.unique(q, return_counts=True)
        p = counts / counts.sum()
        entropy += float(-(p * np.log2(p)).sum()) * q.size
    return {**bits, "int8_entropy": entropy / n}


def render(outcomes: list[Outcome], central: float, rounds: int) -> tuple[str, dict]:
    marks = [r for r in (5, 10, 20) if r <= rounds]
    head = [
        "K",
        "partition",
        *[f"bf16 @{r}" for r in marks],
        "replica final",
        "max gap fp32 vs replica (pts)",
        "max gap bf16 vs replica (pts)",
        "int8 final",
        "up KiB/round bf16 / int8",
        "down KiB/round",
        "wall s (bf16)",
        "mean round s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    targets = {"a": True, "b": True, "c": True}
    for o in outcomes:
        fp32, bf16, int8 = (_acc(o.runs[e]) for e in ENCODINGS)
        gap_fp32 = max(abs(a - b) for a, b in zip(fp32, o.replica, strict=True))
        gap_bf16 = max(abs(a - b) for a, b in zip(bf16, o.replica, strict=True))
        rows = o.runs["bf16"]
        up_bf16 = sum(r.bytes_up for r in rows) / len(rows) / 1024
        up_int8 = sum(r.bytes_up for r in o.runs["int8"]) / len(rows) / 1024
        down = sum(r.bytes_down for r in rows) / len(rows) / 1024
        targets["a"] &= gap_fp32 <= 0.005
        targets["b"] &= abs(bf16[-1] - fp32[-1]) <= 0.003
        targets["c"] &= abs(int8[-1] - bf16[-1]) <= 0.005 and up_int8 <= up_bf16 / 2
        lines.append(
            "| "
            + " | ".join(
                [
                    str(o.clients),
                    o.partition,
                    *[_pts(bf16[r - 1]) for r in marks],
                    _pts(o.replica[-1]),
                    _pts(gap_fp32),
                    _pts(gap_bf16),
                    _pts(int8[-1]),
                    f"{up_bf16:.1f} / {up_int8:.1f}",
                    f"{down:.1f}",
                    f"{o.wall_s['bf16']:.1f}",
                    f"{sum(r.seconds for r in rows) / len(rows):.2f}",
                ]
            )
            + " |"
        )
    verdict = {k: "met" if v else "**missed**" for k, v in targets.items()}
    bound = int8_bound()
    text = "\n".join(
        [
            "## Federation (digits MLP, fedmq against a single-process FedAvg replica)",
            "",
            f"Embedded mode. Accuracy in % on the 360-image test set; centralized baseline (same "
            f"model, {rounds} epochs): **{_pts(central)}**.",
            "",
            *lines,
            "",
            f"- (a) fedmq (fp32 transport) within 0.5 points of the replica after every round, "
            f"every K and partition: {verdict['a']}.",
            f"- (b) bf16 transport within 0.3 points of fp32 (final round): {verdict['b']}.",
            f"- (c) int8 deltas with error feedback within 0.5 points of bf16 at ≤ 1/2 of bf16's "
            f"bytes up: {verdict['c']}. Why: one real round-1 delta costs "
            f"{bound['bf16']:.2f} bits/parameter in bf16 and {bound['int8']:.2f} in int8 "
            f"(per-channel scales and header included); the zeroth-order entropy of its int8 "
            f"values alone is {bound['int8_entropy']:.2f} bits/parameter, so a coder of the "
            "values one at a time (zstd's Huffman stage is one) cannot take int8 below "
            f"{100 * bound['int8_entropy'] / bound['bf16']:.0f}% of bf16 on this model. "
            "Reaching half needs fewer levels (4-bit) or sparsity (top-k deltas are ~1 "
            "bit/parameter), not a better int8 coder.",
            "- (d) mean round time in full mode at K = 10: see the full-mode table below. "
            "Embedded 'mean round s' is the round's open → closed time as recorded by the "
            "orchestrator (aggregation and evaluation excluded).",
            "",
            f"Machine load average (1 min) at the end of the run: {os.getloadavg()[0]:.1f} on 2 "
            "cores.",
            "",
            "![fedmq vs replica](img/federation_vs_replica.png)",
        ]
    )
    results = {
        "centralized_final": central,
        "targets": targets,
        "int8_bits_per_param": bound,
        "configs": [
            {
                "clients": o.clients,
                "partition": o.partition,
                "replica": o.replica,
                "accuracy": {e: _acc(o.runs[e]) for e in ENCODINGS},
                "wall_s": o.wall_s,
                "bytes_up": {e: [r.bytes_up for r in o.runs[e]] for e in ENCODINGS},
                "bytes_down": [r.bytes_down for r in o.runs["bf16"]],
            }
            for o in outcomes
        ],
    }
    return text, results


def plot(outcomes: list[Outcome], path: Path = PLOT) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, partition in zip(axes, ("iid", "dirichlet"), strict=True):
        for o in (o for o in outcomes if o.partition == partition):
            xs = range(1, len(o.replica) + 1)
            line = ax.plot(
                xs, [100 * a for a in _acc(o.runs["bf16"])], label=f"fedmq K={o.clients}"
            )
            ax.plot(
                xs,
                [100 * a for a in o.replica],
                ls="--",
                color=line[0].get_color(),
                label=f"replica K={o.clients}",
            )
        ax.set_title("IID" if partition == "iid" else "Dirichlet(0.5)")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("test accuracy (%)")
    fig.suptitle("digits MLP: fedmq (bf16, solid) vs single-process FedAvg replica (dashed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main_full(quick: bool) -> None:
    import federation_full as full

    grid = [(2, "iid")] if quick else [(k, p) for p in ("iid", "dirichlet") for k in (2, 5, 10)]
    rounds = 5 if quick else 20
    started = time.perf_counter()
    outcomes = []
    for k, p in grid:
        outcomes.append(full.measure(k, p, rounds))
        print(f"full K={k} {p}: done after {time.perf_counter() - started:.0f} s", file=sys.stderr)
    table, results, met = full.render(outcomes)
    verdict = "met" if met else "**missed**"
    text = "\n".join(
        [
            "## Federation in full mode (RabbitMQ, PostgreSQL, a Celery worker, device processes)",
            "",
            "Same configuration as the embedded table (digits MLP, bf16 deltas, 20 rounds), run "
            "by `fedmq simulate --broker --database`: the orchestrator in the benchmark's "
            "process, a `fedmq worker` process and K `fedmq device` processes, on this "
            "machine's RabbitMQ and PostgreSQL. Times are means over the rounds, from the "
            "round's opening; *cycle* is opened → next opened (what a user waits per round), "
            "*overhead* = cycle - slowest device's training. See `benchmarks/federation_full.py`.",
            "",
            table,
            "",
            f"- (d) mean round time (cycle) in full mode at most 1 s for K = 10: {verdict}.",
            f"- Machine load average (1 min) at the end of the run: {os.getloadavg()[0]:.1f} "
            "on 2 cores (other work was running on this machine).",
        ]
    )
    if quick:
        print(text)
        return
    publish(
        "federation-full", text, {**results, "seconds": round(time.perf_counter() - started, 1)}
    )
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true", help="full mode (real services)")
    args = parser.parse_args()
    if args.full:
        main_full(args.quick)
        return
    grid = (
        [(2, "iid")] if args.quick else [(k, p) for p in ("iid", "dirichlet") for k in (2, 5, 10)]
    )
    rounds = 5 if args.quick else 20
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = []
        for k, p in grid:
            outcomes.append(measure(k, p, rounds, Path(tmp)))
            print(f"K={k} {p}: done after {time.perf_counter() - started:.0f} s", file=sys.stderr)
    central = run_centralized(ReplicaConfig(rounds=rounds), epochs=rounds)[-1]
    text, results = render(outcomes, central, rounds)
    if args.quick:
        print(text)
        return
    plot(outcomes)
    publish("federation", text, {**results, "seconds": round(time.perf_counter() - started, 1)})
    print(text)


if __name__ == "__main__":
    main()
