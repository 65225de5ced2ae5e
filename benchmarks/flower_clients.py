"""Do unmodified Flower clients learn what native fedmq devices learn?

Digits, the run's MLP 64→128→10, FedAvg, SGD lr 0.05 momentum 0.9, batch 32, 1 local
epoch, IID partitions of seed 0, K = 5, 20 rounds, embedded mode (``simulation.simulate``:
the orchestrator, eager Celery tasks and K device threads over the in-process bus), bf16
updates. The same federation four times, as the devices train:

- native: fedmq's ``LocalTrainer`` on every device;
- NumPyClient: every device runs ``tests/flower_quickstart.py``'s ``numpy_app`` (Flower's
  PyTorch quickstart, a ``NumPyClient`` in a ``ClientApp(client_fn=...)``);
- Message API: every device runs its ``message_app`` (``@app.train()``/``@app.evaluate()``);
- mixed: devices 0-1 native, 2-3 the NumPyClient, 4 the Message API.

The Flower clients train on their own DataLoader (its shuffle from torch's generator, which
fedmq seeds per round and device); native devices shuffle with their own seeded generator.
So the runs differ in batch order only, and their accuracies agree up to that noise.
Accuracy is the server's evaluation of each round's global model on the 360-image test set.

Usage: ``python benchmarks/flower_clients.py [--rounds N] [--seeds 0,1,2] [--no-write]``
(needs ``pip install 'fedmq[flower]'``).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, publish

sys.path.insert(0, str(ROOT))  # tests.flower_quickstart, the Flower user code

from fedmq.settings import Settings
from simulation.simulate import SimOptions, run

K = 5
NUMPY = "tests.flower_quickstart:numpy_app"
MESSAGE = "tests.flower_quickstart:message_app"
FLEETS: dict[str, tuple[str | None, ...]] = {
    "native": (),
    "NumPyClient": (NUMPY,) * K,
    "Message API": (MESSAGE,) * K,
    "mixed (2 native, 2 NumPyClient, 1 Message API)": (None, None, NUMPY, NUMPY, MESSAGE),
}


def federate(flower: tuple[str | None, ...], rounds: int, seed: int, out: Path) -> dict[str, Any]:
    options = SimOptions(
        clients=K, rounds=rounds, seed=seed, encoding="bf16", out=out, flower_clients=flower
    )
    result = run(options, Settings(_env_file=None), Console(file=io.StringIO(), width=120))
    return {
        "accuracy": [r.accuracy for r in result.rows],
        "seconds": result.seconds,
        "mean_round_s": statistics.fmean(r.seconds for r in result.rows),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def table(results: dict[str, dict[int, dict[str, Any]]], rounds: int) -> str:
    seeds = sorted(next(iter(results.values())))
    native = {s: results["native"][s]["accuracy"][-1] for s in seeds}
    head = " | ".join(f"seed {s} @{rounds}" for s in seeds)
    lines = [
        f"| devices | @5 (seed {seeds[0]}) | @10 (seed {seeds[0]}) | {head} | mean final "
        "| max gap vs native (pts) | wall s (seed "
        f"{seeds[0]}) |",
        "|---|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    for name, by_seed in results.items():
        first = by_seed[seeds[0]]["accuracy"]
        finals = [by_seed[s]["accuracy"][-1] for s in seeds]
        gap = max(abs(by_seed[s]["accuracy"][-1] - native[s]) for s in seeds)
        cells = " | ".join(_pct(f) for f in finals)
        lines.append(
            f"| {name} | {_pct(first[4] if len(first) > 4 else None)} | "
            f"{_pct(first[9] if len(first) > 9 else None)} | {cells} | "
            f"{_pct(statistics.fmean(finals))} | {100 * gap:.2f} | "
            f"{by_seed[seeds[0]]['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, dict[int, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fleet in FLEETS.items():
            results[name] = {}
            for seed in seeds:
                out = Path(tmp) / f"{len(results)}-{seed}"
                results[name][seed] = federate(fleet, args.rounds, seed, out)
                acc = results[name][seed]["accuracy"][-1]
                print(f"{name}, seed {seed}: final accuracy {_pct(acc)}", flush=True)
    md = table(results, args.rounds)
    print(md)
    if args.no_write:
        return
    section = (
        "## Flower clients on fedmq (`benchmarks/flower_clients.py`)\n\n"
        f"Digits MLP, FedAvg, K = {K} IID devices, {args.rounds} rounds, embedded mode, bf16 "
        "updates; the same federation with native devices and with unmodified Flower clients "
        "(`tests/flower_quickstart.py`: Flower's PyTorch quickstart as a `NumPyClient` and as a "
        "Message-API `ClientApp`, run by `--flower-client`). Accuracy in % of the server's "
        "evaluation on the 360-image test set; the seed is the run's (model initialisation, "
        "partitions, training seeds). Flower clients shuffle with their own DataLoader, so "
        "they match native devices up to batch order, not bit for bit. Wall s is one run on a "
        "shared machine (the first, native, also pays the process's imports and data loading)."
        f" flwr {metadata.version('flwr')}.\n\n"
        f"{md}\n"
    )
    publish(
        "flower-clients",
        section,
        {"clients": K, "rounds": args.rounds, "seeds": seeds, "fleets": results},
    )


if __name__ == "__main__":
    main()
