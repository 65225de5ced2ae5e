"""Load: 1,000 light simulated devices in one round on the real RabbitMQ + Postgres, with the
orchestrator and a Celery worker as their own processes (``fedmq orchestrator``, ``celery``).

Every device goes through the wire protocol: ``Register`` on ``fedmq.signals`` (all with one
reply key, so one queue collects the ``Registered`` answers and their tokens), a ``ready``
signal, then, once autorun opens round 1 with all of them selected, one small update (an
fp32 delta of a 4-tensor model, ~0.6 KB, one chunk). Publishing runs on 4 threads.

Measured: messages per second per phase (first publish -> last one in the database),
signal-to-database latency (a device's publish time -> the ``last_seen`` the orchestrator
wrote when it processed the ``ready`` signal; same host clock), update-to-database latency
(publish -> the participation's ``received_at``), the orchestrator's peak resident memory
(``VmHWM``), and loss: every update sent must be in exactly one participation row and the
round must close with all of them and aggregate.

    .venv/bin/python benchmarks/load.py              # 1,000 devices, writes docs + JSON
    .venv/bin/python benchmarks/load.py --devices 100 --quick   # prints only
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


def model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "l1.weight": rng.normal(0, 0.1, (8, 8)).astype(np.float32),
        "l1.bias": np.zeros(8, np.float32),
        "l2.weight": rng.normal(0, 0.1, (8, 8)).astype(np.float32),
        "l2.bias": np.zeros(8, np.float32),
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


def run(n: int) -> dict[str, Any]:
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
        base = model()
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
        route = topology.update_routing_key(run_id, 1)

        def update(cid: str) -> None:
            g = np.random.default_rng(int(hashlib.sha256(cid.encode()).hexdigest()[:8], 16))
            trained = {
                k: v + g.normal(0, 0.01, v.shape).astype(np.float32) for k, v in base.items()
            }
            blob = encode(trained, Encoding.FP32, base=base, base_version="0")
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
            (chunk,) = chunking.split(blob)
            headers = {**chunking.to_headers(chunk), "x-fedmq-envelope": meta.model_dump_json()}
            update_sent[cid] = time.time()
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
        return {
            "devices": n,
            "update_bytes": len(encode(base, Encoding.FP32, base=base, base_version="0")),
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
    args = parser.parse_args()
    small = run(args.compare) if args.compare else None
    r = run(args.devices)
    if small is not None:
        r["compare"] = small
    table = markdown(r)
    print(table)
    print(machine_line(machine()))
    if not args.quick:
        publish("load", table, r)
    return 0 if r["lost"] == 0 and r["aggregated"] == r["devices"] else 1


def markdown(r: dict[str, Any]) -> str:
    table = "\n".join(
        [
            f"## Load: {r['devices']:,} light devices in one round (RabbitMQ + Postgres)",
            "",
            f"{r['devices']:,} simulated devices speak the wire protocol from 4 publisher threads: "
            "register (one reply queue), signal ready, then each sends one "
            f"{r['update_bytes']} B update (fp32 delta, one chunk) in one round that selects all "
            "of them; one `fedmq orchestrator` process (two ingest consumers) and one Celery "
            "worker. Phase rates run from the first publish to the last message in the database.",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| registrations (Register → Registered received) | {r['register_per_s']:.0f} /s "
            f"({r['register_s']:.1f} s) |",
            f"| ready signals (publish → all `ready` in the database) | "
            f"{r['signals_per_s']:.0f} /s "
            f"({r['signals_s']:.1f} s) |",
            f"| signal → database latency p50 / p99 | {r['signal_to_db_p50_ms']:.0f} / "
            f"{r['signal_to_db_p99_ms']:.0f} ms |",
            f"| heartbeats (publish → signals queue drained; refresh-throttled, no write) | "
            f"{r['heartbeats_per_s']:.0f} /s ({r['heartbeats_s']:.1f} s) |",
            f"| updates (publish → all counted) | {r['updates_per_s']:.0f} /s "
            f"({r['updates_s']:.1f} s) |",
            f"| update → database latency p50 / p99 | {r['update_to_db_p50_ms']:.0f} / "
            f"{r['update_to_db_p99_ms']:.0f} ms |",
            f"| **messages per second sustained** (3 per device, all phases) | "
            f"**{r['messages_per_s']:.0f}** |",
            f"| last update counted → round done (aggregate {r['aggregated']} updates, evaluate) | "
            f"{r['last_update_to_round_done_s']:.1f} s |",
            f"| orchestrator peak memory (VmHWM) | {r['orchestrator_peak_rss_mb']:.0f} MB |",
            f"| updates lost (not in exactly one participation row) | **{r['lost']}** |",
            "",
            "Latencies include queueing behind the burst (all devices publish at once), so p99 is "
            "close to the phase's duration; with devices spread over time it would be the "
            "per-message cost.",
        ]
    )
    small = r.get("compare")
    if small:
        table += (
            f"\n\nThe per-message cost grows with the fleet: with {small['devices']} devices the "
            f"same phases ran at {small['register_per_s']:.0f} registrations/s, "
            f"{small['signals_per_s']:.0f} signals/s and {small['updates_per_s']:.0f} updates/s "
            f"({small['messages_per_s']:.0f} messages/s). Every message is one `step_run` "
            "transaction that locks the run and loads and saves its whole machine snapshot "
            "(all clients and the open round; `orchestrator/store.py`), so one run's messages "
            "are processed one at a time at a cost that grows with the run's size."
        )
    return table


if __name__ == "__main__":
    sys.exit(main())
