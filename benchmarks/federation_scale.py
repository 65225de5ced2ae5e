"""Embedded mode at fleet size: what one process spends per client per round.

``fedmq simulate`` (in-process bus, SQLite, eager tasks; digits MLP, bf16, 1 local epoch)
with K = 100 and K = 1,000 devices, each run as its own ``fedmq simulate`` process; the
rounds' phases are read back from the run's database (``federation_full.phases``). The
orchestration cost is the issue's definition: (round cycle - the slowest device's reported
training) / K, the cycle being opened → next opened, round 1 left out (warm-up).

The floor beside it: one device's local step (train + encode its delta) measured alone in
this process, with nothing else running. In one process every device's step shares one
interpreter lock with the orchestrator, so K steps are part of every round whatever the
orchestrator costs; the table shows that share too.

``--old-tree PATH`` runs the same configuration on another checkout in the same session
(``git worktree add /tmp/oldtree <commit>``) for a ratio on this noisy machine, for K up to
``--old-max`` (100: the code before issue 16's embedded work had not finished registering
1,000 devices after 15 minutes).

    .venv/bin/python benchmarks/federation_scale.py [--quick] [--rounds 5] [--old-tree P]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, publish
from federation_full import phases

from devices.config import DeviceConfig, TrainSettings
from devices.local import LocalTrainer
from learning.params import to_numpy


def step_alone(k: int, repeats: int = 200) -> float:
    """Seconds of one device's local step (train + encode) with nothing else running."""
    import torch

    torch.set_num_threads(1)
    trainer = LocalTrainer.from_config(DeviceConfig(run_id="r", client_index=0, num_clients=k))
    trainer.warm_up()
    weights = to_numpy(trainer.model)
    settings = TrainSettings()
    for i in range(20):
        trainer.step(weights, 0, i, settings)
    started = time.perf_counter()
    for i in range(repeats):
        trainer.step(weights, 0, i, settings)
    return (time.perf_counter() - started) / repeats


def simulate(tree: Path, k: int, rounds: int, out: Path) -> dict[str, Any]:
    """One ``fedmq simulate`` process on ``tree``; its phases and peak memory."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("FEDMQ_BROKER_URL", None)
    env.pop("FEDMQ_DATABASE_URL", None)
    cmd = [
        sys.executable,
        "-m",
        "fedmq.cli",
        "simulate",
        "--clients",
        str(k),
        "--rounds",
        str(rounds),
        "--out",
        str(out),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"simulate K={k} on {tree} failed:\n{err[-2000:]}")
    url = f"sqlite:///{out / 'fedmq.sqlite'}"
    run_id = _run_id(out / "fedmq.sqlite")
    ph = phases(url, run_id)[1:]  # round 1 warms up
    n = len(ph)
    mean = {key: sum(p[key] for p in ph) / n for key in ph[0]}
    return {
        "clients": k,
        "rounds": rounds,
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "cycle_s": mean["cycle"],
        "slowest_training_s": mean["slowest_training"],
        "aggregate_s": mean["aggregate"],
        "cost_ms_per_client": 1000 * mean["overhead"] / k,
        "per_round": ph,
    }


def _run_id(path: Path) -> str:
    import sqlite3

    with sqlite3.connect(path) as db:
        row = db.execute("SELECT id FROM runs ORDER BY created_at DESC LIMIT 1").fetchone()
    return str(row[0])


def render(rows: list[dict[str, Any]], steps: dict[int, float], old: bool) -> str:
    head = [
        "code",
        "K",
        "rounds",
        "mean cycle s",
        "slowest training s",
        "aggregate s",
        "**cost ms / client / round**",
        "one step alone ms",
        "K steps / cycle",
        "peak RSS MB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        step = steps[r["clients"]]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["code"],
                    str(r["clients"]),
                    str(r["rounds"]),
                    f"{r['cycle_s']:.2f}",
                    f"{r['slowest_training_s']:.3f}",
                    f"{r['aggregate_s']:.2f}",
                    f"**{r['cost_ms_per_client']:.1f}**",
                    f"{1000 * step:.2f}",
                    f"{100 * r['clients'] * step / r['cycle_s']:.0f} %",
                    f"{r['peak_rss_mb']:.0f}",
                ]
            )
            + " |"
        )
    new = {r["clients"]: r for r in rows if r["code"] == "this"}
    verdict = []
    for k, r in sorted(new.items()):
        met = r["cost_ms_per_client"] <= 2.0
        verdict.append(
            f"K = {k}: {r['cost_ms_per_client']:.1f} ms ({'met' if met else '**missed**'})"
        )
    ratios = []
    if old:
        for k, r in sorted(new.items()):
            before = next((o for o in rows if o["code"] == "old" and o["clients"] == k), None)
            if before is not None:
                ratios.append(
                    f"K = {k}: {before['cycle_s'] / r['cycle_s']:.1f}x shorter rounds than the "
                    "old code in the same session"
                )
    return "\n".join(
        [
            "## Embedded mode at fleet size (`benchmarks/federation_scale.py`)",
            "",
            "`fedmq simulate` in one process (in-process bus, SQLite, eager tasks): digits "
            "MLP, bf16 deltas, 1 local epoch, IID. *cost* = (cycle - slowest reported "
            "training) / K, the issue's orchestration cost; the cycle is opened → next "
            "opened, means over the rounds after the first. *One step alone*: one device's "
            "train + encode measured by itself in the benchmark's process, the floor a "
            "device adds to a round that one interpreter runs; *K steps / cycle* is the "
            "share of the round those steps alone would fill.",
            "",
            *lines,
            "",
            "- Target ≤ 2 ms per client per round: " + "; ".join(verdict) + ".",
            *([f"- {'; '.join(ratios)}."] if ratios else []),
            "",
            f"Machine load average (1 min) at the end of the run: {os.getloadavg()[0]:.1f} "
            f"on {os.cpu_count()} cores.",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="K = 100 only, 3 rounds, no files")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--old-tree", type=Path, default=None)
    ap.add_argument(
        "--old-max", type=int, default=100, help="largest K the old tree runs (it is slow)"
    )
    args = ap.parse_args()
    sizes = [100] if args.quick else [100, 1000]
    rounds = 3 if args.quick else args.rounds
    steps = {k: step_alone(k) for k in sizes}
    rows = []
    trees = [("this", ROOT)] + ([("old", args.old_tree.resolve())] if args.old_tree else [])
    with tempfile.TemporaryDirectory() as tmp:
        for k in sizes:
            for code, tree in trees:
                if code == "old" and k > args.old_max:
                    continue
                r = simulate(tree, k, rounds, Path(tmp) / f"{code}-{k}")
                r["code"] = code
                rows.append(r)
                print(
                    f"{code} K={k}: cycle {r['cycle_s']:.2f} s, "
                    f"{r['cost_ms_per_client']:.1f} ms/client/round",
                    file=sys.stderr,
                )
    text = render(rows, steps, args.old_tree is not None)
    print(text)
    if not args.quick:
        publish(
            "federation-scale",
            text,
            {"step_alone_s": steps, "runs": rows, "old_tree": str(args.old_tree or "")},
        )


if __name__ == "__main__":
    main()
