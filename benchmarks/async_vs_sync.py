"""Synchronous FedAvg with a deadline against asynchronous FedBuff on a heterogeneous fleet.

Digits, MLP, 20 devices (IID), SGD lr 0.05 momentum 0.9, batch 32, 1 local epoch, bf16;
25 % of the devices are slow (+``SLOWDOWN_S`` s per local training), every device drops
out of 10 % of its trainings (silent past the heartbeat timeout: written off, it joins
again). Sync: every ready device in each round, a quorum of half, ``DEADLINE_S`` s
deadline. Async: FedBuff (``--mode async``): buffer ``BUFFER``, all devices at once
(concurrency 20), max staleness ``MAX_STALENESS``, weight 1/sqrt(1+s), server lr 1.
Both run embedded (in-process bus, SQLite, eager tasks), the real orchestrator, worker
tasks and devices; the clock starts when autorun is sent.

Reported: time to 90 % test accuracy, final accuracy, versions per minute, staleness.

Usage: ``python benchmarks/async_vs_sync.py [--quick]`` (--quick: fewer rounds, no files).
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, publish

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import RoundState
from fedmq.settings import Settings
from fedmq.wiring import open_bus, orchestrator_service
from simulation.heterogeneity import Heterogeneity
from simulation.simulate import (
    SimOptions,
    _settings,
    _settle_for_rounds,
    _start_fleet,
    create_sim_run,
    follow,
    start_autorun,
    wait_ready,
)

CLIENTS = 20
SLOW_FRACTION = 0.25
SLOWDOWN_S = 2.0
DROPOUT = 0.1
DEADLINE_S = 10.0
BUFFER = 5
MAX_STALENESS = 10
TARGET = 0.90
PLOT = ROOT / "docs" / "img" / "async_vs_sync.png"


def options(mode: str, rounds: int, out: Path) -> SimOptions:
    return SimOptions(
        clients=CLIENTS,
        rounds=rounds,
        deadline_s=DEADLINE_S,
        heterogeneity=Heterogeneity(
            slow_fraction=SLOW_FRACTION, slowdown_s=SLOWDOWN_S, dropout=DROPOUT
        ),
        out=out,
        mode=mode,
        buffer_size=BUFFER,
        max_staleness=MAX_STALENESS,
        concurrency=CLIENTS,
        staleness="poly",
    )


def _utc(t: datetime) -> float:
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def run_one(o: SimOptions) -> dict[str, Any]:
    """One federation; per finished round/version: seconds since autorun, accuracy."""
    o.out.mkdir(parents=True, exist_ok=True)
    s = _settings(Settings(_env_file=None), o, o.out)
    migrations.upgrade(s.database_url)
    sessions = make_sessionmaker(make_engine(s.database_url))
    run_id = create_sim_run(sessions, o, s, prefix=o.mode)
    bus = open_bus(s)
    service = orchestrator_service(s, bus)
    service.start()
    stop = threading.Event()
    devices = []
    restore = None
    quiet = Console(file=io.StringIO(), width=120)
    try:
        devices = _start_fleet(s, run_id, o, stop)
        wait_ready(sessions, run_id, o.clients, timeout=120)
        restore = _settle_for_rounds()
        t0 = time.time()
        start_autorun(bus, s, run_id, o.rounds)
        follow(sessions, run_id, o.rounds, quiet)
        wall = time.time() - t0
    finally:
        stop.set()
        for d in devices:
            d.join(timeout=15)
        service.stop()
        bus.close()
        if restore is not None:
            restore()
    points: list[dict[str, Any]] = []
    with session_scope(sessions) as ss:
        for r in q.list_rounds(ss, run_id):
            if r.state != RoundState.DONE or r.model_version_id is None:
                continue
            mv = q.get_model_version_by_id(ss, r.model_version_id)
            assert mv is not None
            m = mv.metrics or {}
            points.append(
                {
                    "round": r.number,
                    "version": mv.version,
                    "t_s": round(_utc(mv.created_at) - t0, 3),
                    "accuracy": (r.metrics or {}).get("accuracy"),
                    "updates": m.get("num_updates"),
                    "staleness": m.get("staleness"),
                }
            )
    return {"run_id": run_id, "wall_s": round(wall, 2), "points": points}


def time_to(points: list[dict[str, Any]], target: float) -> float | None:
    for p in points:
        if p["accuracy"] is not None and p["accuracy"] >= target:
            return float(p["t_s"])
    return None


def summary(res: dict[str, Any]) -> dict[str, Any]:
    pts = res["points"]
    final = pts[-1]["accuracy"] if pts else None
    best = max((p["accuracy"] or 0.0) for p in pts) if pts else None
    minutes = res["wall_s"] / 60.0
    hist: dict[str, int] = {}
    for p in pts:
        for st in p["staleness"] or []:
            hist[str(st)] = hist.get(str(st), 0) + 1
    return {
        "time_to_90_s": time_to(pts, TARGET),
        "final_accuracy": final,
        "best_accuracy": best,
        "versions": len(pts),
        "versions_per_min": round(len(pts) / minutes, 2) if minutes else None,
        "wall_s": res["wall_s"],
        "staleness_hist": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
    }


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in results.items():
        pts = res["points"]
        ax.plot([p["t_s"] for p in pts], [100 * (p["accuracy"] or 0) for p in pts], label=name)
    ax.axhline(100 * TARGET, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("seconds since autorun")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits MLP, {CLIENTS} devices, 25 % 5x slow, 10 % dropout")
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sync-rounds", type=int, default=30)
    ap.add_argument("--async-versions", type=int, default=120)
    args = ap.parse_args()
    sync_rounds, async_versions = (3, 8) if args.quick else (args.sync_rounds, args.async_versions)
    results: dict[str, dict[str, Any]] = {}
    with TemporaryDirectory() as tmp:
        for name, mode, n in (
            ("sync FedAvg (deadline)", "sync", sync_rounds),
            ("async FedBuff", "async", async_versions),
        ):
            res = run_one(options(mode, n, Path(tmp) / mode))
            results[name] = {**res, "summary": summary(res)}
            print(name, results[name]["summary"], flush=True)
    if args.quick:
        return
    plot(results, PLOT)
    s_sync = results["sync FedAvg (deadline)"]["summary"]
    s_async = results["async FedBuff"]["summary"]
    speedup: float | None = None
    if s_sync["time_to_90_s"] and s_async["time_to_90_s"]:
        speedup = round(s_sync["time_to_90_s"] / s_async["time_to_90_s"], 2)
        speedup_text = f"{speedup}x"
    elif s_async["time_to_90_s"]:
        # Sync never got there: its whole run is a lower bound on its time to 90 %.
        bound = round(s_sync["wall_s"] / s_async["time_to_90_s"], 2)
        speedup_text = f"more than {bound}x (sync did not reach 90 % in its {sync_rounds} rounds)"
    else:
        speedup_text = "n/a (async did not reach 90 %)"

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.2f} %"

    def sec(v: float | None) -> str:
        return "not reached" if v is None else f"{v:.1f} s"

    rows = "\n".join(
        f"| {name} | {sec(r['summary']['time_to_90_s'])} | {pct(r['summary']['final_accuracy'])} "
        f"| {pct(r['summary']['best_accuracy'])} | {r['summary']['versions']} "
        f"| {r['summary']['versions_per_min']} | {r['summary']['wall_s']:.1f} s |"
        for name, r in results.items()
    )
    md = f"""## Asynchronous FedBuff against synchronous FedAvg (`benchmarks/async_vs_sync.py`)

Digits MLP, {CLIENTS} devices (IID), 25 % of them slow (+{SLOWDOWN_S:g} s a local training),
10 % dropout per training (written off after the heartbeat timeout, then rejoining).
Sync: FedAvg, quorum 1/2, deadline {DEADLINE_S:g} s, {sync_rounds} rounds. Async: FedBuff,
buffer {BUFFER}, concurrency {CLIENTS}, max staleness {MAX_STALENESS}, weight 1/√(1+s),
server lr 1, {async_versions} versions. Embedded mode; time from the autorun command.

| mode | time to 90 % | final accuracy | best accuracy | rounds/versions | per minute | wall |
|---|---|---|---|---|---|---|
{rows}

Speed-up to 90 %: {speedup_text} (target: at least 2x, final accuracy
within 1 point). Async staleness of the folded updates (versions behind: count):
{s_async["staleness_hist"]}.

![time to accuracy](img/async_vs_sync.png)
"""
    publish("async_vs_sync", md, {"speedup_to_90": speedup, "speedup": speedup_text, **results})


if __name__ == "__main__":
    main()
