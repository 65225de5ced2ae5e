"""Synchronous FedAvg with a deadline against asynchronous FedBuff on a heterogeneous fleet.

K = 20 devices (IID), SGD lr 0.05 momentum 0.9, batch 32, 1 local epoch, bf16; 25 % of
the devices are slow (+``SLOWDOWN_S`` s per local training: about 5x a fast device's),
every device drops out of 10 % of its trainings (silent past the heartbeat timeout:
written off, then it joins again). Sync: every ready device in each round, a quorum of
half, ``DEADLINE_S`` s deadline. Async: FedBuff (``--mode async``): buffer ``BUFFER``, all
devices at once (concurrency 20), max staleness ``MAX_STALENESS``, weight 1/sqrt(1+s),
server lr 1. The real orchestrator, worker tasks and devices; the clock starts when
autorun is sent and each run is cut at the same wall time, so final accuracies compare
at equal wall time.

Scenarios: digits MLP and mnist1d MLP embedded (in-process bus, SQLite, eager tasks), and
digits MLP in full mode (RabbitMQ, Postgres, a Celery worker and 20 device processes, on
a scratch vhost and database, ``benchmarks/_scratch.py``).

Reported: time to the target accuracy (90 % on digits), accuracy at equal wall time,
versions per minute, staleness, the load average.

Usage: ``python benchmarks/async_vs_sync.py [--quick] [--no-full]``
(--quick: short runs, no files).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import RESULTS, ROOT, machine_line, publish, write_section
from _scratch import drop_scratch, make_scratch

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import RoundState
from fedmq.settings import Settings
from fedmq.wiring import open_bus, orchestrator_service
from simulation.heterogeneity import Heterogeneity
from simulation.simulate import (
    SimOptions,
    _settle_for_rounds,
    _start_fleet,
    create_sim_run,
    follow,
    sim_settings,
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
# Time-to-accuracy targets: the 90 % on digits; MNIST-1D with an MLP tops out far
# lower, so its target is a level both modes can reach in the time given.
TARGETS = {"digits": 0.90, "mnist1d": 0.50}
IMG = ROOT / "docs" / "img"


def options(dataset: str, mode: str, out: Path) -> SimOptions:
    return SimOptions(
        dataset=dataset,
        clients=CLIENTS,
        rounds=100_000,  # the wall-time cap ends every run
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


def run_one(o: SimOptions, cap_s: float) -> dict[str, Any]:
    """One federation cut at ``cap_s`` s after autorun; per finished round/version: seconds
    since autorun, accuracy."""
    o.out.mkdir(parents=True, exist_ok=True)
    s = sim_settings(Settings(_env_file=None), o, o.out)
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
        wait_ready(sessions, run_id, o.clients, timeout=300)
        if s.embedded:
            restore = _settle_for_rounds()
        load = os.getloadavg()[0]
        t0 = time.time()
        start_autorun(bus, s, run_id, o.rounds)
        cut = threading.Timer(cap_s, stop.set)
        cut.start()
        follow(sessions, run_id, o.rounds, quiet, stop)
        cut.cancel()
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
    points = [p for p in points if p["t_s"] <= wall]
    return {"run_id": run_id, "wall_s": round(wall, 2), "load_1m": round(load, 2), "points": points}


def time_to(points: list[dict[str, Any]], target: float) -> float | None:
    for p in points:
        if p["accuracy"] is not None and p["accuracy"] >= target:
            return float(p["t_s"])
    return None


def accuracy_at(points: list[dict[str, Any]], t: float) -> float | None:
    """The accuracy of the newest version built by ``t`` s (None: none yet)."""
    acc = None
    for p in points:
        if p["t_s"] <= t and p["accuracy"] is not None:
            acc = p["accuracy"]
    return acc


def summary(res: dict[str, Any], target: float) -> dict[str, Any]:
    pts = res["points"]
    final = pts[-1]["accuracy"] if pts else None
    best = max((p["accuracy"] or 0.0) for p in pts) if pts else None
    minutes = res["wall_s"] / 60.0
    hist: dict[str, int] = {}
    for p in pts:
        for st in p["staleness"] or []:
            hist[str(st)] = hist.get(str(st), 0) + 1
    return {
        "target": target,
        "time_to_target_s": time_to(pts, target),
        "final_accuracy": final,
        "best_accuracy": best,
        "versions": len(pts),
        "versions_per_min": round(len(pts) / minutes, 2) if minutes else None,
        "wall_s": res["wall_s"],
        "staleness_hist": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
    }


def plot(scenarios: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    """One panel per scenario: accuracy against seconds since autorun, both modes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scenarios), figsize=(5.2 * len(scenarios), 4), squeeze=False)
    for ax, (title, results) in zip(axes[0], scenarios.items(), strict=True):
        target = next(iter(results.values()))["summary"]["target"]
        for name, res in results.items():
            pts = res["points"]
            xs = [p["t_s"] for p in pts]
            ys = [100 * (p["accuracy"] or 0) for p in pts]
            ax.plot(xs, ys, label=name, marker="." if len(pts) < 40 else None)
        ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("seconds since autorun")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"K = {CLIENTS}, 25 % of devices +{SLOWDOWN_S:g} s (5x), 10 % dropout", fontsize=10
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Speed-up to the target and accuracy at equal wall time, async against sync."""
    sync, asy = results.values()
    ss, sa = sync["summary"], asy["summary"]
    t_equal = min(sync["wall_s"], asy["wall_s"])  # the async run's: sync may run longer
    acc_sync, acc_async = accuracy_at(sync["points"], t_equal), accuracy_at(asy["points"], t_equal)
    speedup: float | None = None
    if ss["time_to_target_s"] and sa["time_to_target_s"]:
        speedup = round(ss["time_to_target_s"] / sa["time_to_target_s"], 2)
        text = f"{speedup}x"
    elif sa["time_to_target_s"]:
        # Sync never got there: its whole run is a lower bound on its time to target.
        bound = round(sync["wall_s"] / sa["time_to_target_s"], 2)
        text = f"more than {bound}x (sync did not reach it in {sync['wall_s']:.0f} s)"
    else:
        text = "n/a (async did not reach it)"
    gap = None
    if acc_sync is not None and acc_async is not None:
        gap = round(100 * (acc_async - acc_sync), 2)
    return {
        "equal_wall_s": round(t_equal, 1),
        "accuracy_sync_at_equal": acc_sync,
        "accuracy_async_at_equal": acc_async,
        "async_minus_sync_points": gap,
        "speedup_to_target": speedup,
        "speedup": text,
    }


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f} %"


def _sec(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.1f} s"


def section(title: str, results: dict[str, dict[str, Any]], cmp: dict[str, Any]) -> str:
    target = next(iter(results.values()))["summary"]["target"]
    rows = "\n".join(
        f"| {name} | {_sec(r['summary']['time_to_target_s'])} "
        f"| {_pct(accuracy_at(r['points'], cmp['equal_wall_s']))} "
        f"| {_pct(r['summary']['best_accuracy'])} | {r['summary']['versions']} "
        f"| {r['summary']['versions_per_min']} | {r['wall_s']:.1f} s | {r['load_1m']} |"
        for name, r in results.items()
    )
    asy = list(results.values())[1]["summary"]
    gap = cmp["async_minus_sync_points"]
    within = (
        "n/a"
        if gap is None
        else "async within 1 point of sync or above it"
        if gap >= -1.0
        else "async more than 1 point below sync"
    )
    header = (
        f"| mode | time to {100 * target:.0f} % | accuracy at {cmp['equal_wall_s']:.0f} s "
        "| best | rounds/versions | per minute | wall | load (1 min) |"
    )
    return f"""### {title}

{header}
|---|---|---|---|---|---|---|---|
{rows}

Speed-up to {100 * target:.0f} %: **{cmp["speedup"]}**; async minus sync at equal wall time:
**{cmp["async_minus_sync_points"]} points** ({within}). Staleness of the folded updates (versions
behind: count): {asy["staleness_hist"]}.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-full", action="store_true", help="skip the full-mode comparison")
    ap.add_argument("--digits-s", type=float, default=60.0, help="wall time per digits run")
    ap.add_argument("--mnist1d-s", type=float, default=40.0, help="wall time per mnist1d run")
    ap.add_argument("--full-s", type=float, default=60.0, help="wall time per full-mode run")
    ap.add_argument(
        "--converge",
        type=float,
        metavar="S",
        help="instead: digits embedded, both modes run S s each (long enough for sync to "
        "converge), final accuracies compared (section async_vs_sync_converged)",
    )
    ap.add_argument(
        "--republish-converged",
        action="store_true",
        help="rebuild the --converge section from its stored JSON",
    )
    args = ap.parse_args()
    if args.republish_converged:
        republish_converged()
        return
    if args.converge:
        converge(args.converge)
        return
    caps = (15.0, 15.0, 20.0) if args.quick else (args.digits_s, args.mnist1d_s, args.full_s)
    plan: list[tuple[str, str, float, bool]] = [
        ("digits MLP, embedded", "digits", caps[0], False),
        ("mnist1d MLP, embedded", "mnist1d", caps[1], False),
    ]
    if not args.no_full:
        plan.append(
            ("digits MLP, full mode (RabbitMQ, Postgres, processes)", "digits", caps[2], True)
        )
    scenarios: dict[str, dict[str, dict[str, Any]]] = {}
    comparisons: dict[str, dict[str, Any]] = {}
    started = time.time()
    with TemporaryDirectory() as tmp:
        for title, dataset, cap, full in plan:
            results: dict[str, dict[str, Any]] = {}
            # Async first: its time to target decides how long sync may run. Sync gets
            # the same wall time, or longer where async reached the target early enough
            # for "at least 2x sooner" to be decided (2.2x its time, at most 2.5x the cap);
            # accuracies still compare at the same wall time, the async run's.
            for name, mode in (("async FedBuff", "async"), ("sync FedAvg (deadline)", "sync")):
                run_cap = cap
                t_async = (
                    results["async FedBuff"]["summary"]["time_to_target_s"] if results else None
                )
                if mode == "sync" and t_async is not None:
                    run_cap = max(cap, min(2.2 * t_async + 5.0, 2.5 * cap))
                o = options(dataset, mode, Path(tmp) / f"{dataset}-{mode}-{int(full)}")
                scratch = make_scratch("bench_async") if full else None
                if scratch is not None:
                    o = replace(o, broker=scratch.amqp_url, database=scratch.db_url)
                try:
                    res = run_one(o, run_cap)
                finally:
                    if scratch is not None:
                        drop_scratch(scratch)
                results[name] = {**res, "summary": summary(res, TARGETS[dataset])}
                print(title, name, results[name]["summary"], flush=True)
            results = {k: results[k] for k in ("sync FedAvg (deadline)", "async FedBuff")}
            scenarios[title] = results
            comparisons[title] = compare(results)
            print(title, comparisons[title], flush=True)
    total = round(time.time() - started, 1)
    print(f"benchmark wall {total} s", flush=True)
    if args.quick:
        return
    plot(scenarios, IMG / "async_vs_sync.png")
    body = "\n".join(section(t, r, comparisons[t]) for t, r in scenarios.items())
    md = f"""## Asynchronous FedBuff against synchronous FedAvg (`benchmarks/async_vs_sync.py`)

{CLIENTS} devices (IID), 25 % of them slow (+{SLOWDOWN_S:g} s a local training, about 5x a
fast device), 10 % dropout per training (written off after the heartbeat timeout, then
rejoining). Sync: FedAvg, quorum 1/2, deadline {DEADLINE_S:g} s. Async: FedBuff, buffer
{BUFFER}, concurrency {CLIENTS}, max staleness {MAX_STALENESS}, weight 1/√(1+s), server lr
1. Async runs are cut at a fixed wall time after the autorun command (digits {caps[0]:g} s,
mnist1d {caps[1]:g} s, full mode {caps[2]:g} s); sync runs as long, or longer where async
reached the target early enough to decide "2x sooner" (2.2x async's time to target, at
most 2.5x the cap). "Accuracy at" compares both at the async run's wall time.
Targets: 90 % on digits (the issue's), 50 % on MNIST-1D (an MLP's reach in this time).
"Final accuracy within 1 point" is read at equal wall time: neither mode is run to
convergence here (sync would need minutes more per scenario).
Whole benchmark: {total:.0f} s on a shared 2-core machine (the load column is the 1-minute
load average when each run started: other jobs ran beside it).

{body}
![time to accuracy](img/async_vs_sync.png)
"""
    publish(
        "async_vs_sync",
        md,
        {"comparisons": comparisons, "scenarios": scenarios, "benchmark_wall_s": total},
    )


def _tail_mean(points: list[dict[str, Any]], n: int = 5) -> float | None:
    """The mean accuracy of the last ``n`` evaluations: one evaluation of 360 images moves
    by a point or more from one version to the next, so a final figure is a tail mean."""
    accs = [p["accuracy"] for p in points if p["accuracy"] is not None][-n:]
    return sum(accs) / len(accs) if accs else None


def converge(cap_s: float) -> None:
    """Both modes on digits (embedded) for ``cap_s`` s each, long enough for synchronous
    FedAvg to converge: the issue's "final accuracy within 1 point", which the equal-time
    comparison above cannot read (sync is still far from converged there)."""
    results: dict[str, dict[str, Any]] = {}
    started = time.time()
    with TemporaryDirectory() as tmp:
        for name, mode in (("async FedBuff", "async"), ("sync FedAvg (deadline)", "sync")):
            res = run_one(options("digits", mode, Path(tmp) / mode), cap_s)
            sm = summary(res, TARGETS["digits"])
            sm["tail_mean_accuracy"] = _tail_mean(res["points"])
            results[name] = {**res, "summary": sm}
            print(name, sm, flush=True)
    total = round(time.time() - started, 1)
    publish(
        "async_vs_sync_converged",
        converged_section(results, cap_s, total),
        {"results": results, "cap_s": cap_s, "benchmark_wall_s": total},
    )


def converged_section(results: dict[str, dict[str, Any]], cap_s: float, total: float) -> str:
    a, y = results["async FedBuff"]["summary"], results["sync FedAvg (deadline)"]["summary"]
    gap = None
    if a["tail_mean_accuracy"] is not None and y["tail_mean_accuracy"] is not None:
        gap = 100.0 * (a["tail_mean_accuracy"] - y["tail_mean_accuracy"])
    if a["time_to_target_s"] and y["time_to_target_s"]:
        verdict_speed = f"{y['time_to_target_s'] / a['time_to_target_s']:.2f}x"
    elif a["time_to_target_s"]:
        lower = cap_s / a["time_to_target_s"]
        verdict_speed = f"more than {lower:.1f}x (sync did not reach 90 % in {cap_s:g} s)"
    else:
        verdict_speed = "not measured (async did not reach 90 %)"
    rows = []
    for name, r in results.items():
        sm = r["summary"]
        rows.append(
            f"| {name} | {_sec(sm['time_to_target_s'])} | {_pct(sm['tail_mean_accuracy'])} | "
            f"{_pct(sm['final_accuracy'])} | {_pct(sm['best_accuracy'])} | {sm['versions']} | "
            f"{r['wall_s']:.0f} s | {r['load_1m']} |"
        )
    verdict_gap = (
        "not measured"
        if gap is None
        else f"{gap:+.2f} points (async {'is not' if gap >= -1.0 else 'IS'} more than 1 point "
        "below sync)"
    )
    still_rising = (
        y["tail_mean_accuracy"] is not None
        and y["final_accuracy"] is not None
        and (y["final_accuracy"] > y["tail_mean_accuracy"])
    )
    caveat = (
        " Sync was still rising at the cut (its last evaluation above its tail mean): its "
        "converged accuracy is higher than shown, so the gap is an upper bound on async's lead."
        if still_rising
        else ""
    )
    return f"""## Async against sync over a longer run (`benchmarks/async_vs_sync.py --converge`)

The same fleet and settings as the section above (digits MLP, embedded, K = {CLIENTS},
25 % slow, 10 % dropout, sync deadline {DEADLINE_S:g} s, async buffer {BUFFER}), each mode
run {cap_s:g} s (4x the equal-time cut above), to read the issue's "final accuracy within
1 point" further along than the equal-time comparison can. *Final (tail mean)*: the mean of
the last 5 evaluations (one evaluation on 360 images moves a point or more between
versions).

| mode | time to 90 % | final (tail mean) | last | best | rounds/versions | wall | load (1 min) |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Speed-up to 90 %: **{verdict_speed}**; final accuracy, async minus sync:
**{verdict_gap}**.{caveat} Whole run {total:.0f} s.
"""


def republish_converged() -> None:
    """Rebuild the section from the stored JSON, with the run's own machine line (after a
    change to the section's text only)."""
    stored = json.loads((RESULTS / "async_vs_sync_converged.json").read_text())
    data = stored["results"]
    cap = float(data.get("cap_s", 240.0))
    md = converged_section(data["results"], cap, data["benchmark_wall_s"])
    write_section(
        "async_vs_sync_converged", f"{md.rstrip()}\n\n{machine_line(stored['machine'])}\n"
    )


if __name__ == "__main__":
    main()
