"""Load: 1,000 light simulated devices in one round on the real RabbitMQ + Postgres, with the
orchestrator and a Celery worker as their own processes (``fedmq orchestrator``, ``celery``),
then 100 devices sending ~1 MB updates in one round (fresh processes, vhost and database).

Every device goes through the wire protocol: ``Register`` on ``fedmq.signals`` (all with one
reply key, so one queue collects the ``Registered`` answers and their tokens), a ``ready``
signal, then, once autorun opens round 1 with all of them selected, one update. A light
update is an fp32 delta of a 4-tensor model (~0.6 KB, one chunk); a big one is an fp32 delta
of noise on a 512x640 tensor (incompressible: ~1 MB, encoded before the clock starts, sent
as one chunk since the default chunk size is 4 MiB). Publishing runs on 4 threads.

Measured: messages per second per phase (first publish -> last one in the database),
signal-to-database latency (a device's publish time -> the ``last_seen`` the orchestrator
wrote when it processed the ``ready`` signal; same host clock), update-to-database latency
(publish -> the participation's ``received_at``), MB/s of updates, the orchestrator's peak
resident memory (``VmHWM``), the load average while it ran, and loss: every update sent must
be in exactly one participation row and the round must close with all of them and aggregate.

    .venv/bin/python benchmarks/load.py              # 1,000 + 250 light, 100 big; docs + JSON
    .venv/bin/python benchmarks/load.py --devices 100 --quick --compare 0 --big 0  # prints
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _report import machine, machine_line, publish
from _scratch import drop_scratch, make_scratch
from sqlalchemy import func, select

from db import migrations
from db import queries as q
from db.engine import make_engine, make_sessionmaker, session_scope
from db.models import Client, Participation, ParticipationState
from orchestrator.runs import create_run
from orchestrator.state import RoundPolicy
from protocol import chunking, topology
from protocol.bus import Bus, connect
from protocol.codec import Encoding, encode
from protocol.messages import (
    ClientState,
    Command,
    CommandAction,
    Heartbeat,
    Register,
    Registered,
    Signal,
    UpdateMeta,
    parse_as,
)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "load-operator-token-0123456789"
REPLY_KEY = "loadreplies"
THREADS = 4
BIG_SHAPE = (512, 640)

# The figures before the snapshot was saved in parts and cached (orchestrator/store.py):
# benchmarks/results/load.json as measured 2026-11-29 19:55 UTC on the same 2-core machine.
BEFORE: dict[str, Any] = {
    "date": "2026-11-29 19:55 UTC",
    "devices": 1000,
    "register_per_s": 40.58443583193452,
    "signals_per_s": 31.995936795288408,
    "signal_to_db_p50_ms": 15612.614512443542,
    "signal_to_db_p99_ms": 30393.984298706055,
    "heartbeats_per_s": 94.66343010714903,
    "updates_per_s": 16.675866818527187,
    "update_to_db_p50_ms": 28225.428223609924,
    "update_to_db_p99_ms": 56986.01715326309,
    "messages_per_s": 25.89312868623279,
    "orchestrator_peak_rss_mb": 121.7890625,
    "lost": 0,
    "compare": {"devices": 250, "messages_per_s": 43.594734032498486},
}


# The committed code of that 19:55 run (421a2e6), run again on this machine at 22:00 UTC with
# 250 devices: the machine (a new instance since ~20:57) is much slower than the one of 19:55.
OLD_CODE_NOW: dict[str, Any] = {
    "date": "2026-11-29 22:00 UTC",
    "commit": "421a2e6",
    "devices": 250,
    "register_per_s": 250 / 11.7,
    "signals_per_s": 250 / 10.5,
    "updates_per_s": 250 / 21.2,
    "messages_per_s": 750 / (11.7 + 10.5 + 21.2),
    "before_messages_per_s": 43.594734032498486,
}

# The same working tree with orchestrator/store.py, serde.py, projection.py and the
# orchestrator queries as they were before this change, run on the same machine just before
# the figures below (the 19:55 ones came from a quieter machine): 1,000 devices.
SAME_TREE_BEFORE: dict[str, Any] = {
    "date": "2026-11-29 21:45 UTC",
    "register_per_s": 1000 / 67.9,
    "signals_per_s": 1000 / 86.7,
    "heartbeats_per_s": 1000 / 31.3,
    "updates_per_s": 1000 / 161.1,
    "messages_per_s": 3000 / (67.9 + 86.7 + 161.1),
    "load_avg_1m_mean": 1.9,
}


def model(big: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if big:
        return {"w": rng.normal(0, 0.1, BIG_SHAPE).astype(np.float32)}
    return {
        "l1.weight": rng.normal(0, 0.1, (8, 8)).astype(np.float32),
        "l1.bias": np.zeros(8, np.float32),
        "l2.weight": rng.normal(0, 0.1, (8, 8)).astype(np.float32),
        "l2.bias": np.zeros(8, np.float32),
    }


def trained(base: dict[str, np.ndarray], cid: str) -> bytes:
    """A device's update: the model plus its own noise, as an fp32 delta against it."""
    g = np.random.default_rng(int(hashlib.sha256(cid.encode()).hexdigest()[:8], 16))
    mine = {k: v + g.normal(0, 0.01, v.shape).astype(np.float32) for k, v in base.items()}
    return encode(mine, Encoding.FP32, base=base, base_version="0")


class LoadAverage:
    """The 1-minute load average every few seconds while a scenario runs (the machine is
    shared: a busy neighbour shows here)."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadAverage:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        return {
            "load_avg_1m_start": self.samples[0],
            "load_avg_1m_mean": float(np.mean(self.samples)),
            "load_avg_1m_max": max(self.samples),
            "load_avg_1m_end": self.samples[-1],
        }


def in_threads(items: list[Any], fn: Any) -> None:
    threads = [
        threading.Thread(target=lambda k=k: [fn(x) for x in items[k::THREADS]])
        for k in range(THREADS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait(predicate: Any, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.time()
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p)) * 1000  # ms


def run(n: int, *, big: bool = False) -> dict[str, Any]:
    with LoadAverage() as load:
        out = _run(n, big)
    return {**out, **load.summary()}


def _run(n: int, big: bool) -> dict[str, Any]:
    scratch = make_scratch("fedmq_load")
    vhost, amqp, db_url = scratch.vhost, scratch.amqp_url, scratch.db_url
    procs: list[subprocess.Popen[bytes]] = []
    engine = None
    bus: Bus | None = None
    try:
        migrations.upgrade(db_url)
        env = {
            **os.environ,
            "FEDMQ_BROKER_URL": amqp,
            "FEDMQ_DATABASE_URL": db_url,
            "FEDMQ_OPERATOR_TOKEN": TOKEN,
        }
        env.pop("FEDMQ_RESULT_BACKEND", None)

        def start(*args: str) -> subprocess.Popen[bytes]:
            p = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            procs.append(p)
            return p

        start(
            *("-m", "celery", "-A", "workers.app", "worker", "-Q", "aggregate,evaluate"),
            *("--concurrency", "1", "--pool", "solo", "--loglevel", "WARNING"),
            *("--without-gossip", "--without-mingle", "--without-heartbeat"),
        )
        orch = start("-m", "fedmq.cli", "orchestrator")
        engine = make_engine(db_url)
        sessions = make_sessionmaker(engine)
        bus = connect(amqp)
        topology.declare(bus)
        base = model(big)
        policy = RoundPolicy(
            min_clients=n, quorum_fraction=1.0, deadline_s=900, heartbeat_timeout_s=3600
        )
        with session_scope(sessions) as s:
            run_id = create_run(s, "load", encode(base, Encoding.FP32), policy=policy)
        replies = topology.declare_device(bus, REPLY_KEY)

        def count(stmt: Any) -> int:
            with session_scope(sessions) as s:
                return int(s.scalar(stmt) or 0)

        # 1. Registration: n Register messages, n Registered answers on one queue.
        regs = [
            Register(run_id=run_id, display_name=f"d{i}", reply_key=REPLY_KEY) for i in range(n)
        ]
        key = topology.signal_routing_key(REPLY_KEY)
        t0 = time.time()
        in_threads(regs, lambda m: bus.publish(topology.SIGNALS_EXCHANGE, key, m.to_json()))
        tokens: dict[str, str] = {}
        deadline = time.monotonic() + 300
        while len(tokens) < n and time.monotonic() < deadline:
            d = bus.get(replies, timeout=1.0)
            if d is None:
                continue
            d.ack()
            msg = parse_as(d.body, Registered)
            tokens[msg.client_id] = msg.token
        t_registered = time.time()
        assert len(tokens) == n, f"{len(tokens)} of {n} registered"

        # 2. Ready signals: publish time per client vs the last_seen the orchestrator wrote.
        sent_at: dict[str, float] = {}

        def ready(cid: str) -> None:
            sig = Signal(run_id=run_id, client_id=cid, token=tokens[cid], state=ClientState.READY)
            sent_at[cid] = time.time()
            bus.publish(topology.SIGNALS_EXCHANGE, topology.signal_routing_key(cid), sig.to_json())

        ids = sorted(tokens)
        t1 = time.time()
        in_threads(ids, ready)
        ready_count = (
            select(func.count())
            .select_from(Client)
            .where(Client.run_id == run_id, Client.state == "ready")
        )
        t_ready = wait(lambda: count(ready_count) == n, 300, "every device ready")
        with session_scope(sessions) as s:
            seen = {c.id: c.last_seen.timestamp() for c in q.list_clients(s, run_id)}
        signal_lat = [seen[c] - sent_at[c] for c in ids]

        # 2b. One heartbeat per device, measured until the signals queue is drained. A
        # heartbeat within a quarter of the timeout of the last refresh writes nothing (the
        # machine's refresh throttle), so this is the common, cheap path.
        def queued() -> int:
            out = subprocess.run(
                ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "messages"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            for line in out.splitlines():
                name, _, depth = line.partition("\t")
                if name == topology.SIGNALS_QUEUE:
                    return int(depth)
            return 0

        def beat(cid: str) -> None:
            hb = Heartbeat(run_id=run_id, client_id=cid, token=tokens[cid])
            bus.publish(topology.SIGNALS_EXCHANGE, topology.signal_routing_key(cid), hb.to_json())

        t_hb = time.time()
        in_threads(ids, beat)
        t_beats = wait(lambda: queued() == 0, 300, "every heartbeat consumed")

        # 3. One round, everyone selected; one small update each.
        cmd = Command(run_id=run_id, action=CommandAction.AUTORUN, rounds=1, operator_token=TOKEN)
        bus.publish(topology.CONTROL_EXCHANGE, topology.CONTROL_ROUTING_KEY, cmd.to_json())

        def round_open() -> bool:
            with session_scope(sessions) as s:
                r = q.get_round(s, run_id, 1)
                return r is not None and len(q.list_participations(s, r.id)) == n

        wait(round_open, 300, "round 1 open with every device")
        update_sent: dict[str, float] = {}
        message_ids: dict[str, str] = {}
        # Big updates are encoded before the clock starts (the devices' work, not the
        # platform's); light ones inside it, as the earlier figures were measured.
        blobs = {cid: trained(base, cid) for cid in ids} if big else {}

        def update(cid: str) -> None:
            blob = blobs[cid] if big else trained(base, cid)
            meta = UpdateMeta(
                run_id=run_id,
                client_id=cid,
                round=1,
                token=tokens[cid],
                base_model_version=0,
                num_samples=10,
                encoding="fp32",
                blob_sha256=hashlib.sha256(blob).hexdigest(),
                blob_bytes=len(blob),
            )
            message_ids[cid] = meta.message_id
            envelope = meta.model_dump_json()
            route = topology.update_routing_key(run_id, 1, cid)
            update_sent[cid] = time.time()
            for chunk in chunking.iter_chunks(blob):
                headers = {**chunking.to_headers(chunk), "x-fedmq-envelope": envelope}
                bus.publish(topology.UPDATES_EXCHANGE, route, chunk.data, headers=headers)

        t2 = time.time()
        in_threads(ids, update)
        counted = (
            select(func.count())
            .select_from(Participation)
            .where(Participation.state == ParticipationState.UPDATE)
        )
        t_updates = wait(lambda: count(counted) == n, 600, "every update counted")

        def round_done() -> bool:
            with session_scope(sessions) as s:
                r = q.get_round(s, run_id, 1)
                return r is not None and str(r.state) == "done"

        t_done = wait(round_done, 600, "round 1 done")
        with session_scope(sessions) as s:
            r = q.get_round(s, run_id, 1)
            assert r is not None
            parts = q.list_participations(s, r.id)
            per_message = Counter(p.message_id for p in parts if p.state == "update")
            received = {p.client_id: p.received_at.timestamp() for p in parts if p.received_at}
            mv = q.get_model_version_by_id(s, r.model_version_id) if r.model_version_id else None
            aggregated = int(mv.metrics.get("num_updates", 0)) if mv else 0
        lost = [c for c in ids if per_message[message_ids[c]] != 1]
        update_lat = [received[c] - update_sent[c] for c in ids if c in received]
        peak = peak_rss_mb(orch.pid)
        sizes = [len(b) for b in blobs.values()] or [len(trained(base, ids[0]))]
        update_bytes = float(np.mean(sizes))
        return {
            "devices": n,
            "big": big,
            "update_bytes": update_bytes,
            "chunks_per_update": -(-int(max(sizes)) // chunking.DEFAULT_CHUNK_SIZE),
            "mb_per_s": n * update_bytes / 1e6 / (t_updates - t2),
            "register_s": t_registered - t0,
            "register_per_s": n / (t_registered - t0),
            "signals_s": t_ready - t1,
            "signals_per_s": n / (t_ready - t1),
            "signal_to_db_p50_ms": pct(signal_lat, 50),
            "signal_to_db_p99_ms": pct(signal_lat, 99),
            "heartbeats_s": t_beats - t_hb,
            "heartbeats_per_s": n / (t_beats - t_hb),
            "updates_s": t_updates - t2,
            "updates_per_s": n / (t_updates - t2),
            "update_to_db_p50_ms": pct(update_lat, 50),
            "update_to_db_p99_ms": pct(update_lat, 99),
            "messages_per_s": 3 * n / ((t_registered - t0) + (t_ready - t1) + (t_updates - t2)),
            "last_update_to_round_done_s": t_done - t_updates,
            "aggregated": aggregated,
            "orchestrator_peak_rss_mb": peak,
            "lost": len(lost),
        }
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        if bus is not None:
            bus.close()
        if engine is not None:
            engine.dispose()
        drop_scratch(scratch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="print only, write nothing")
    parser.add_argument("--compare", type=int, default=250, help="a smaller fleet too (0: no)")
    parser.add_argument(
        "--big", type=int, default=100, help="devices sending ~1 MB updates (0: no)"
    )
    args = parser.parse_args()
    small = run(args.compare) if args.compare else None
    r = run(args.devices)
    big = run(args.big, big=True) if args.big else None
    if small is not None:
        r["compare"] = small
    if big is not None:
        r["big_updates"] = big
    r["before"] = BEFORE
    r["same_tree_before"] = SAME_TREE_BEFORE
    r["old_code_now"] = OLD_CODE_NOW
    table = markdown(r)
    print(table)
    print(machine_line(machine()))
    if not args.quick:
        publish("load", table, r)
    ok = [x for x in (r, small, big) if x is not None]
    return 0 if all(x["lost"] == 0 and x["aggregated"] == x["devices"] for x in ok) else 1


def _ms(r: dict[str, Any], key: str) -> str:
    return f"{r[f'{key}_p50_ms']:,.0f} / {r[f'{key}_p99_ms']:,.0f} ms"


def _load(r: dict[str, Any]) -> str:
    return (
        f"{r['load_avg_1m_mean']:.1f} mean, {r['load_avg_1m_max']:.1f} max "
        f"({r['load_avg_1m_start']:.1f} at the start)"
    )


def markdown(r: dict[str, Any]) -> str:
    b = r.get("before") if r["devices"] == BEFORE["devices"] else None

    def row(label: str, now: str, before: str = "") -> str:
        return f"| {label} | {before} | {now} |" if b else f"| {label} | {now} |"

    def rate(key: str, seconds: str) -> str:
        return f"{r[key]:.0f} /s ({r[seconds]:.1f} s)"

    lines = [
        f"## Load: {r['devices']:,} light devices in one round (RabbitMQ + Postgres)",
        "",
        f"{r['devices']:,} simulated devices speak the wire protocol from 4 publisher threads: "
        "register (one reply queue), signal ready, then each sends one "
        f"{r['update_bytes']:.0f} B update (fp32 delta, one chunk) in one round that selects "
        "all of them; one `fedmq orchestrator` process (two ingest consumers) and one Celery "
        "worker. Phase rates run from the first publish to the last message in the database.",
        "",
    ]
    if b:
        lines += [
            f"| measure | before ({b['date']}) | now |",
            "|---|---:|---:|",
        ]
    else:
        lines += ["| measure | value |", "|---|---:|"]
    lines += [
        row(
            "registrations (Register → Registered received)",
            rate("register_per_s", "register_s"),
            f"{b['register_per_s']:.0f} /s" if b else "",
        ),
        row(
            "ready signals (publish → all `ready` in the database)",
            rate("signals_per_s", "signals_s"),
            f"{b['signals_per_s']:.0f} /s" if b else "",
        ),
        row(
            "signal → database latency p50 / p99",
            _ms(r, "signal_to_db"),
            _ms(b, "signal_to_db") if b else "",
        ),
        row(
            "heartbeats (publish → signals queue drained; refresh-throttled, no write)",
            rate("heartbeats_per_s", "heartbeats_s"),
            f"{b['heartbeats_per_s']:.0f} /s" if b else "",
        ),
        row(
            "updates (publish → all counted)",
            rate("updates_per_s", "updates_s"),
            f"{b['updates_per_s']:.0f} /s" if b else "",
        ),
        row(
            "update → database latency p50 / p99",
            _ms(r, "update_to_db"),
            _ms(b, "update_to_db") if b else "",
        ),
        row(
            "**messages per second sustained** (3 per device, all phases)",
            f"**{r['messages_per_s']:.0f}**",
            f"**{b['messages_per_s']:.0f}**" if b else "",
        ),
        row(
            f"last update counted → round done (aggregate {r['aggregated']} updates, evaluate)",
            f"{r['last_update_to_round_done_s']:.1f} s",
            "2.2 s" if b else "",
        ),
        row(
            "orchestrator peak memory (VmHWM)",
            f"{r['orchestrator_peak_rss_mb']:.0f} MB",
            f"{b['orchestrator_peak_rss_mb']:.0f} MB" if b else "",
        ),
        row(
            "updates lost (not in exactly one participation row)",
            f"**{r['lost']}**",
            f"**{b['lost']}**" if b else "",
        ),
        "",
        f"Load average (1 min) on the 2-core machine during the run: {_load(r)}.",
    ]
    if b:
        t = SAME_TREE_BEFORE
        lines += [
            "",
            "The before column is the committed run of "
            f"{b['date']}. The same tree without this change, run on this machine just "
            f"before ({t['date']}, load average {t['load_avg_1m_mean']:.1f}), managed "
            f"{t['register_per_s']:.0f} registrations/s, {t['signals_per_s']:.0f} signals/s, "
            f"{t['heartbeats_per_s']:.0f} heartbeats/s and {t['updates_per_s']:.0f} updates/s: "
            f"**{t['messages_per_s']:.0f} messages/s**. And the very code of the before column "
            f"(commit {OLD_CODE_NOW['commit']}), run again on this machine at "
            f"{OLD_CODE_NOW['date'][11:]} with {OLD_CODE_NOW['devices']} devices, managed "
            f"{OLD_CODE_NOW['messages_per_s']:.0f} messages/s where it had managed "
            f"{OLD_CODE_NOW['before_messages_per_s']:.0f} at 19:55: this setup (the machine "
            "was restarted since) runs the same code about 2.5 times slower than it did then, "
            "so the before column flatters the old code.",
        ]
    lines += [
        "",
        "Latencies include queueing behind the burst (all devices publish at once), so p99 is "
        "close to the phase's duration; with devices spread over time it would be the "
        "per-message cost.",
    ]
    small = r.get("compare")
    if small:
        lines += [
            "",
            f"With {small['devices']} devices the same phases ran at "
            f"{small['register_per_s']:.0f} registrations/s, {small['signals_per_s']:.0f} "
            f"signals/s and {small['updates_per_s']:.0f} updates/s "
            f"(**{small['messages_per_s']:.0f} messages/s**"
            + (
                f"; before: {b['compare']['messages_per_s']:.0f}, against "
                f"{b['messages_per_s']:.0f} with {b['devices']:,}"
                if b
                else ""
            )
            + "). Every message is one `step_run` transaction that locks the run row, so one "
            "run's messages are processed one at a time. It used to load and save the run's "
            "whole machine snapshot (all clients and the open round, serialised with "
            "`dataclasses.asdict`), a cost that grew with the fleet; now the snapshot is saved "
            "in parts (a row per client record and per received update, the rest in "
            "`runs.machine`, written only when it changes) and each orchestrator process "
            "reuses the snapshot it last saw while `runs.machine_seq` read under the lock "
            "still matches (`orchestrator/store.py`), so a step costs the same at any fleet "
            "size: a handful of single-row statements and its commit.",
        ]
    big = r.get("big_updates")
    if big:
        lines += ["", *markdown_big(big)]
    return "\n".join(lines)


def markdown_big(r: dict[str, Any]) -> list[str]:
    chunks = r["chunks_per_update"]
    return [
        f"### {r['devices']} devices sending {r['update_bytes'] / 1e6:.1f} MB updates",
        "",
        f"A second scenario with its own orchestrator, worker, vhost and database: "
        f"{r['devices']} devices register and signal ready the same way, then each sends one "
        f"{r['update_bytes'] / 1e6:.2f} MB update (fp32 delta of noise on a 512x640 tensor, "
        f"incompressible; {chunks} chunk{'s' if chunks != 1 else ''} each at the default "
        f"{chunking.DEFAULT_CHUNK_SIZE >> 20} MiB chunk size), encoded before the clock "
        "starts, from 4 publisher threads into one round that selects all of them.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| updates (publish → all counted) | {r['updates_per_s']:.1f} /s "
        f"({r['updates_s']:.1f} s) |",
        f"| update throughput | {r['mb_per_s']:.1f} MB/s |",
        f"| update → database latency p50 / p99 | {_ms(r, 'update_to_db')} |",
        f"| last update counted → round done (aggregate {r['aggregated']} updates, evaluate) | "
        f"{r['last_update_to_round_done_s']:.1f} s |",
        f"| orchestrator peak memory (VmHWM) | {r['orchestrator_peak_rss_mb']:.0f} MB |",
        f"| updates lost (not in exactly one participation row) | **{r['lost']}** |",
        "",
        f"Load average (1 min) during this scenario: {_load(r)}.",
    ]


if __name__ == "__main__":
    sys.exit(main())
