"""Dashboard benchmark: how long each page takes with 1,000 clients and 200 rounds in Postgres.

A fresh database is seeded in bulk through ``db.queries.bulk`` (one run, 1,000 clients,
200 done rounds with every client selected in each: 200,000 participations, ~2% dropped and
~1% late; 200,000+ events; 201 model versions). Then each page is measured two ways:

1. AppTest: the page's script run time under ``streamlit.testing.v1.AppTest`` (all its queries
   and rendering, no browser), first run and median of the warm reruns.
2. Browser: ``fedmq dashboard`` served as a process and Debian's headless Chromium (Playwright)
   opening the page in a fresh tab, timed from navigation until the page's content is drawn
   (its table, charts or buttons visible).

Target: under 2 s per page.

``--fleet`` is a cross-device run instead (issue 16, item 6): 100,000 registered clients,
50 rounds of 1,000 sampled ones, and each read behind the pages timed alone as well; it
writes its own section (``dashboard-fleet``).

    .venv/bin/python benchmarks/dashboard.py            # writes docs/benchmarks.md + JSON
    .venv/bin/python benchmarks/dashboard.py --fleet    # 100,000 clients; its own section
    .venv/bin/python benchmarks/dashboard.py --quick    # 200 clients x 40 rounds, prints only
    # --keep / --reuse DB: seed once, measure again; --no-publish: print only
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _report import machine, machine_line, publish
from sqlalchemy import create_engine, make_url, text

from db import blobstore, migrations
from db import queries as q
from db.engine import make_engine, session_scope
from db.models import (
    BlobKind,
    Client,
    ClientState,
    Event,
    ModelVersion,
    Participation,
    ParticipationState,
    Round,
    RoundState,
    RunStatus,
)
from db.queries.bulk import insert_returning_ids, insert_rows

# This file is named like the dashboard package and its folder is sys.path[0]: drop the folder
# (``_report`` is imported by now) so that the app's `import dashboard` finds the package.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
ROOT = HERE.parent
APP = ROOT / "dashboard" / "app.py"
PG = os.environ.get("BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGES = ("overview", "rounds", "events", "controls")
TARGET_S = 2.0


def seed(url: str, clients: int, rounds: int, per_round: int | None = None) -> str:
    """One run with ``clients`` clients and ``rounds`` done rounds; returns the run id.

    ``per_round``: the clients each round selects (a fresh random sample each time, as a
    capped run draws them), every client when None. A sampled (cross-device) run also gets
    the events such a run writes: each client's join and ready, and per selected client its
    moves to training and finish besides its accepted update.
    """
    rng = random.Random(0)
    migrations.upgrade(url)
    engine = make_engine(url)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    sampled = per_round is not None and per_round < clients
    with session_scope(engine) as s:
        run = q.create_run(s, "bench-dashboard", {"strategy": {"name": "fedavg"}})
        run_id = run.id
        sha = blobstore.put(s, rng.randbytes(100_000), BlobKind.MODEL)
        ids = [uuid.uuid4().hex for _ in range(clients)]
        chosen = [
            sorted(rng.sample(ids, per_round)) if sampled and per_round else ids
            for _ in range(rounds)
        ]
        taken = Counter(c for sel in chosen for c in sel)
        insert_rows(
            s,
            Client,
            (
                {
                    "id": cid,
                    "run_id": run_id,
                    "display_name": f"device-{k}",
                    "state": rng.choice([ClientState.READY] * 9 + [ClientState.OFFLINE]),
                    "joined_at": t0 + timedelta(milliseconds=k),
                    "last_seen": t0 + timedelta(hours=1),
                    "device_info": {},
                    "token_hash": uuid.uuid4().hex + uuid.uuid4().hex,
                    "rounds_participated": taken[cid],
                }
                for k, cid in enumerate(ids)
            ),
        )
        versions = insert_returning_ids(
            s,
            ModelVersion,
            [
                {"run_id": run_id, "version": v, "blob_sha": sha, "created_at": t0, "metrics": {}}
                for v in range(rounds + 1)
            ],
        )
        opened = [t0 + timedelta(seconds=10 * n) for n in range(1, rounds + 1)]
        round_ids = insert_returning_ids(
            s,
            Round,
            [
                {
                    "run_id": run_id,
                    "number": n,
                    "state": RoundState.DONE,
                    "opened_at": opened[n - 1],
                    "closed_at": opened[n - 1] + timedelta(seconds=8),
                    "received": len(chosen[n - 1]),
                    "quorum": len(chosen[n - 1]) // 2,
                    "attempt": 1,
                    "base_version_id": versions[n - 1],
                    "model_version_id": versions[n],
                    "metrics": {
                        "accuracy": 0.5 + 0.45 * n / rounds,
                        "loss": 2.0 - 1.5 * n / rounds,
                    },
                }
                for n in range(1, rounds + 1)
            ],
        )

        def part_state() -> ParticipationState:
            x = rng.random()
            if x < 0.02:
                return ParticipationState.DROPPED
            if x < 0.03:
                return ParticipationState.LATE
            return ParticipationState.UPDATE

        insert_rows(
            s,
            Participation,
            (
                {
                    "round_id": rid,
                    "client_id": cid,
                    "state": part_state(),
                    "num_samples": 300 + k % 50,
                    "bytes": 15_000 + rng.randrange(1_000),
                    "loss": rng.uniform(0.1, 2.0),
                    "accuracy": rng.uniform(0.5, 1.0),
                    "received_at": opened[n] + timedelta(seconds=rng.uniform(1, 8)),
                }
                for n, rid in enumerate(round_ids)
                for k, cid in enumerate(chosen[n])
            ),
        )

        def state(cid: str, old: str | None, new: str, at: datetime, n: int | None) -> Any:
            detail = {"from": old, "to": new, "reason": new}
            return {
                "run_id": run_id,
                "kind": "client.state",
                "client_id": cid,
                "round": n,
                "ts": at,
                "detail": detail,
            }

        def events() -> Any:
            if sampled:
                for k, cid in enumerate(ids):
                    at = t0 + timedelta(milliseconds=k)
                    yield state(cid, None, "join", at, None)
                    yield state(cid, "join", "ready", at, None)
            for n in range(1, rounds + 1):
                at = opened[n - 1]
                sel = chosen[n - 1]
                detail = {"selected": sel, "quorum": len(sel) // 2} if sampled else {}
                yield {"run_id": run_id, "kind": "round.opened", "round": n, "ts": at,
                       "detail": detail}  # fmt: skip
                for cid in sel:
                    if sampled:
                        yield state(cid, "ready", "training", at, n)
                    yield {
                        "run_id": run_id,
                        "kind": "update.accepted",
                        "client_id": cid,
                        "round": n,
                        "ts": at + timedelta(seconds=2),
                        "detail": {"round": n},
                    }
                    if sampled:
                        yield state(cid, "update", "finish", at + timedelta(seconds=8), n)
                for kind in ("round.closed", "aggregate.done", "evaluate.done", "round.done"):
                    yield {"run_id": run_id, "kind": kind, "round": n, "ts": at, "detail": {}}
                yield {
                    "run_id": run_id,
                    "kind": "auth.rejected",
                    "client_id": ids[n % clients],
                    "ts": at,
                    "detail": {"reason": f"unknown client or bad token for {ids[n % clients]}"},
                }

        insert_rows(s, Event, events())
        q.set_run_status(s, run_id, RunStatus.FINISHED)
        q.set_autorun(s, run_id, 0)
        s.execute(
            text("UPDATE runs SET current_round = :n WHERE id = :id"), {"n": rounds, "id": run_id}
        )
    with engine.connect() as conn:
        conn.execute(text("ANALYZE"))
        conn.commit()
    engine.dispose()
    return run_id


def apptest_times(url: str, run_id: str, repeats: int) -> dict[str, dict[str, float]]:
    from streamlit.testing.v1 import AppTest

    os.environ["FEDMQ_DATABASE_URL"] = url
    os.environ["FEDMQ_BROKER_URL"] = "memory://bench"
    out: dict[str, dict[str, float]] = {}
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["run"] = run_id
    samples: dict[str, list[float]] = {p: [] for p in PAGES}
    for i in range(repeats + 1):
        for page in PAGES:
            if i or page != "overview":  # the first run opens the default page, overview
                at.switch_page(f"views/{page}.py")
            t = time.perf_counter()
            at.run()
            samples[page].append(time.perf_counter() - t)
            assert not at.exception, at.exception
    for page, xs in samples.items():
        out[page] = {"first_s": xs[0], "median_s": statistics.median(xs[1:]), "max_s": max(xs[1:])}
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def browser_times(url: str, run_id: str, repeats: int) -> dict[str, dict[str, dict[str, float]]]:
    from playwright.sync_api import ViewportSize, expect, sync_playwright

    port = _free_port()
    env = {**os.environ, "FEDMQ_DATABASE_URL": url, "FEDMQ_BROKER_URL": "memory://"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmq.cli", "dashboard", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        ways = ("cold", "cached", "navigate")
        samples: dict[str, dict[str, list[float]]] = {w: {p: [] for p in PAGES} for w in ways}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            viewport: ViewportSize = {"width": 1400, "height": 1000}
            try:
                shared = browser.new_context(viewport=viewport)  # keeps the HTTP cache
                for _ in range(repeats + 1):
                    for name in PAGES:
                        # cold: a new browser context, nothing cached (a first visit)
                        ctx = browser.new_context(viewport=viewport)
                        samples["cold"][name].append(_load(ctx.new_page(), base, name, run_id))
                        ctx.close()
                        # cached: a new tab of a browser that has the app's scripts cached
                        tab = shared.new_page()
                        samples["cached"][name].append(_load(tab, base, name, run_id))
                        tab.close()
                # navigate: the sidebar's links inside an open app (no reload)
                tab = shared.new_page()
                _load(tab, base, "overview", run_id)
                for _ in range(repeats + 1):
                    for name in (*PAGES[1:], PAGES[0]):
                        t = time.perf_counter()
                        tab.get_by_role("link", name=name.capitalize()).click()
                        expect(tab.get_by_role("heading", name=name.capitalize())).to_be_visible()
                        _drawn(tab, name)
                        samples["navigate"][name].append(time.perf_counter() - t)
            finally:
                browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {
        way: {
            p: {"first_s": xs[0], "median_s": statistics.median(xs[1:]), "max_s": max(xs[1:])}
            for p, xs in pages.items()
        }
        for way, pages in samples.items()
    }


def _load(tab: Any, base: str, name: str, run_id: str) -> float:
    t = time.perf_counter()
    tab.goto(f"{base}/{'' if name == 'overview' else name}?run={run_id}")
    _drawn(tab, name)
    return time.perf_counter() - t


def _drawn(tab: Any, name: str) -> None:
    """Wait until the page's content is on screen: its table, its charts or its buttons."""
    from playwright.sync_api import expect

    wait = {"timeout": 30_000}
    if name == "rounds":
        expect(tab.get_by_test_id("stVegaLiteChart")).to_have_count(5, **wait)
        expect(tab.get_by_test_id("stDataFrame")).to_be_visible(**wait)
    elif name == "controls":
        expect(tab.get_by_role("button", name="Autorun 3")).to_be_visible(**wait)
    else:
        expect(tab.get_by_test_id("stDataFrame").first).to_be_visible(**wait)


def query_times(url: str, run_id: str, repeats: int) -> dict[str, dict[str, float]]:
    """Each read behind the pages alone (db/queries/dashboard.py), first call and median."""
    from db.engine import make_sessionmaker
    from db.queries import dashboard as dq

    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as s:
        total = dq.count_clients(s, run_id)
        some = dq.client_page(s, run_id, offset=total // 2, limit=1).rows[0]
    calls: dict[str, Any] = {
        "run_overview": lambda s: dq.run_overview(s, run_id),
        "client_page first": lambda s: dq.client_page(s, run_id, limit=50),
        "client_page last": lambda s: dq.client_page(s, run_id, offset=total - 50, limit=50),
        "client_page offline": lambda s: dq.client_page(s, run_id, states=["offline"]),
        "find_clients": lambda s: dq.find_clients(s, run_id),
        "find_clients name": lambda s: dq.find_clients(s, run_id, some.display_name[:9]),
        "client_names page": lambda s: dq.client_names(s, run_id, [some.id]),
        "round_stats": lambda s: dq.round_stats(s, [run_id]),
        "events newest": lambda s: dq.list_events_filtered(s, run_id, limit=100),
        "events of a client": lambda s: dq.list_events_filtered(s, run_id, client_id=some.id),
        "events of a round": lambda s: dq.list_events_filtered(s, run_id, round=3),
        "event_kinds": lambda s: dq.event_kinds(s, run_id),
        "count_events": lambda s: dq.count_events(s, run_id),
        "list_refusals": lambda s: dq.list_refusals(s, run_id),
    }
    out = {}
    for name, call in calls.items():
        xs = []
        for _ in range(repeats + 1):
            with session_scope(sessions) as s:
                t = time.perf_counter()
                call(s)
                xs.append(time.perf_counter() - t)
        out[name] = {"first_s": xs[0], "median_s": statistics.median(xs[1:])}
    engine.dispose()
    return out


# (clients, rounds, clients per round) of each scenario, and its section in the docs.
SCENARIOS: dict[str, tuple[int, int, int | None]] = {
    "quick": (200, 40, None),
    "default": (1000, 200, None),
    "fleet": (100_000, 50, 1000),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 clients x 40 rounds; print only")
    ap.add_argument(
        "--fleet",
        action="store_true",
        help="a cross-device run: 100,000 clients, 50 rounds of 1,000 (own docs section)",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the seeded database, print its name")
    ap.add_argument("--reuse", metavar="DATABASE", help="a database kept by --keep (no seeding)")
    ap.add_argument("--no-publish", action="store_true", help="print only (a comparison run)")
    args = ap.parse_args()
    scenario = "quick" if args.quick else ("fleet" if args.fleet else "default")
    clients, rounds, per_round = SCENARIOS[scenario]
    browser_repeats = max(2, args.repeats // 2 + 1)
    admin_url = make_url(PG)
    name = args.reuse or f"fedmq_bench_dash_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    if not args.reuse:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    seed_s = 0.0
    try:
        if args.reuse:
            migrations.upgrade(url)  # a database kept before a new migration
            with session_scope(make_engine(url)) as s:
                run_id = str(s.execute(text("SELECT id FROM runs")).scalar_one())
        else:
            t = time.perf_counter()
            run_id = seed(url, clients, rounds, per_round)
            seed_s = time.perf_counter() - t
            print(f"seeded {clients} clients x {rounds} rounds in {seed_s:.1f} s")
        engine = make_engine(url)
        with session_scope(engine) as s:
            counts = {
                table: int(s.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
                for table in ("clients", "rounds", "participations", "events", "model_versions")
            }
        engine.dispose()
        print(counts)
        loads = [os.getloadavg()[0]]
        queries = query_times(url, run_id, args.repeats)
        for what, r in queries.items():
            print(f"query   {what:22s} first {r['first_s']:.3f} s  median {r['median_s']:.3f} s")
        app = apptest_times(url, run_id, args.repeats)
        for page, r in app.items():
            print(f"AppTest {page:9s} first {r['first_s']:.3f} s  median {r['median_s']:.3f} s")
        web: dict[str, dict[str, dict[str, float]]] = {}
        if not args.no_browser:
            web = browser_times(url, run_id, browser_repeats)
            for way, pages in web.items():
                for page, r in pages.items():
                    print(
                        f"browser {way:8s} {page:9s} first {r['first_s']:.3f} s  "
                        f"median {r['median_s']:.3f} s"
                    )
        loads.append(os.getloadavg()[0])
    finally:
        if args.keep:
            print(f"kept database {name} (run {run_id}): --reuse {name}")
        else:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    if args.quick or args.no_publish:
        print(machine_line(machine()))
        return 0

    def med(r: dict[str, float] | None) -> str:
        return "—" if r is None else f"{r['median_s']:.2f} s"

    if scenario == "fleet":
        title = f"## Dashboard page load at {clients:,} devices (cross-device run)"
        what = (
            f"`benchmarks/dashboard.py --fleet`: Postgres seeded in bulk with one run of "
            f"{counts['clients']:,} registered clients and {counts['rounds']} done rounds of "
            f"{per_round:,} sampled clients each ({counts['participations']:,} participations, "
            f"{counts['events']:,} events: every client's join and ready, each selected "
            "client's moves and accepted update)."
        )
    else:
        title = f"## Dashboard page load ({clients:,} clients, {rounds} rounds)"
        what = (
            f"`benchmarks/dashboard.py`: Postgres seeded in bulk with {counts['clients']:,} "
            f"clients, {counts['rounds']} done rounds, {counts['participations']:,} "
            f"participations and {counts['events']:,} events."
        )
    lines = [
        title,
        "",
        f"{what} Medians of {args.repeats} (AppTest) and "
        f"{browser_repeats} (browser) loads after a first one. **AppTest**: the "
        "page's script run (every query + rendering) under `streamlit.testing.v1.AppTest`. "
        "**Browser**: `fedmq dashboard` as a process and headless Chromium (Playwright), from "
        "navigation until the page's table, charts or buttons are drawn: *cold* is a fresh "
        "browser profile (Streamlit's scripts downloaded and compiled), *cached* a new tab of a "
        "browser that has them, *navigate* a click on the sidebar inside the open app. "
        "Target: < 2 s.",
        "",
        "| page | AppTest first | AppTest median | browser cold | browser cached "
        "| browser navigate |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for page in PAGES:
        a = app[page]
        lines.append(
            f"| {page} | {a['first_s']:.2f} s | {a['median_s']:.2f} s | "
            + " | ".join(med(web.get(way, {}).get(page)) for way in ("cold", "cached", "navigate"))
            + " |"
        )
    if scenario == "fleet":
        lines += [
            "",
            "The reads behind the pages, alone (`db/queries/dashboard.py`; median of "
            f"{args.repeats} after a first call):",
            "",
            "| query | first | median |",
            "|---|---:|---:|",
            *(
                f"| {q_} | {r['first_s'] * 1000:.1f} ms | {r['median_s'] * 1000:.1f} ms |"
                for q_, r in queries.items()
            ),
        ]
    lines += [
        "",
        "The page's own work (AppTest) stays far under the target; a fresh tab's load is mostly "
        "Streamlit's front end (its scripts, then the chart and table components), not the "
        "queries. 1-minute load average of this shared 2-core machine during the run: "
        f"{min(loads):.1f} to {max(loads):.1f}.",
    ]
    publish(
        "dashboard-fleet" if scenario == "fleet" else "dashboard",
        "\n".join(lines),
        {"clients": clients, "rounds": rounds, "per_round": per_round, "counts": counts,
         "seed_s": seed_s, "queries": queries, "apptest": app, "browser": web,
         "target_s": TARGET_S, "load_average": loads},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
